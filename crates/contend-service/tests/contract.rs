//! The HTTP contract, end to end on each backend: every endpoint's success and error paths,
//! the check order, more than 40 bad inputs that must change nothing, auth, idempotency
//! (including concurrent duplicates), OpenAPI, metrics and health.

mod common;

use common::{ADMIN, Api, Kind, Resp, Server, TestDb};
use contend_test_support::on_backends;
use serde_json::{Value, json};

on_backends!(contract);

#[track_caller]
fn expect(r: &Resp, status: u16, code: &str) {
    assert_eq!(
        (r.status, r.code().as_str()),
        (status, code),
        "body: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
}

/// Everything observable that a bad request must not change.
async fn snapshot(api: &Api, accounts: &[i64], sku: &str, event: i64) -> Value {
    let mut accs = Vec::new();
    for id in accounts {
        accs.push(
            api.get(&format!("/accounts/{id}"), Some(ADMIN))
                .await
                .json(),
        );
        accs.push(
            api.get(&format!("/accounts/{id}/transfers"), Some(ADMIN))
                .await
                .json(),
        );
    }
    let product = api.get(&format!("/products/{sku}"), None).await.json();
    let seat = api
        .post_with(
            "/events/0/bookings",
            ADMIN,
            &[],
            json!({"account": 1, "seat": 1}),
        )
        .await
        .status;
    json!({"accounts": accs, "product": product, "audit": api.audit().await, "event": event, "probe": seat})
}

async fn contract(kind: Kind) {
    let db = TestDb::new(kind).await;
    let server = Server::start(&db.url, common::Options::default()).await;
    let api = server.api();

    // --- success paths ---------------------------------------------------------------------
    let r = api.get("/healthz", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");

    let r = api
        .post(
            "/accounts",
            ADMIN,
            json!({"owner": "alice", "balance": 1000}),
        )
        .await;
    assert_eq!(r.status, 201);
    let v = r.json();
    assert_eq!(
        (
            v["owner"].as_str(),
            v["balance"].as_i64(),
            v["version"].as_i64()
        ),
        (Some("alice"), Some(1000), Some(0))
    );
    let token = v["token"].as_str().unwrap();
    assert!(token.len() >= 32, "token too short: {token}");
    let (a, ta) = (v["id"].as_i64().unwrap(), token.to_string());
    let r = api.post("/accounts", ADMIN, json!({"owner": "bob"})).await;
    assert_eq!(r.json()["balance"], 0, "balance defaults to 0");
    let (b, tb) = (r.id(), r.json()["token"].as_str().unwrap().to_string());
    // SQL-looking strings are stored literally.
    let evil = "x'); DROP TABLE accounts; --";
    let r = api.post("/accounts", ADMIN, json!({"owner": evil})).await;
    assert_eq!(r.status, 201);
    let c = r.id();
    assert_eq!(
        api.get(&format!("/accounts/{c}"), Some(ADMIN)).await.json()["owner"],
        evil
    );

    let r = api.get(&format!("/accounts/{a}"), Some(&ta)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"id": a, "owner": "alice", "balance": 1000, "version": 0})
    );

    let r = api
        .post(
            &format!("/accounts/{a}/deposit"),
            ADMIN,
            json!({"amount": 500}),
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.json()["balance"].as_i64(),
            r.json()["version"].as_i64()
        ),
        (200, Some(1500), Some(1))
    );
    let r = api
        .post(
            &format!("/accounts/{a}/withdraw"),
            &ta,
            json!({"amount": 200}),
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.json()["balance"].as_i64(),
            r.json()["version"].as_i64()
        ),
        (200, Some(1300), Some(2))
    );

    let r = api
        .post(
            "/transfers",
            &ta,
            json!({"from": a, "to": b, "amount": 300}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let t1 = r.id();
    assert_eq!(
        r.json(),
        json!({"id": t1, "from": a, "to": b, "amount": 300})
    );
    let r = api
        .post(
            "/transfers",
            &tb,
            json!({"from": b, "to": a, "amount": 100}),
        )
        .await;
    let t2 = r.id();
    assert_eq!(api.balance(a).await, 1100);
    assert_eq!(api.balance(b).await, 200);
    let r = api
        .get(&format!("/accounts/{a}/transfers"), Some(&ta))
        .await;
    assert_eq!(r.status, 200);
    let ids: Vec<i64> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![t2, t1], "both directions, newest first");
    // Pages by id: `limit`, then `before` = the last id seen.
    let page = |query: String| async move {
        let r = api
            .get(&format!("/accounts/{a}/transfers?{query}"), Some(ADMIN))
            .await;
        let ids: Vec<i64> = match r.json().as_array() {
            Some(list) => list.iter().map(|t| t["id"].as_i64().unwrap()).collect(),
            None => Vec::new(),
        };
        (r.status, r.code_or_empty(), ids)
    };
    assert_eq!(page("limit=1".into()).await, (200, String::new(), vec![t2]));
    assert_eq!(
        page(format!("limit=1&before={t2}")).await,
        (200, String::new(), vec![t1])
    );
    assert_eq!(
        page(format!("before={t1}")).await,
        (200, String::new(), vec![])
    );
    for (query, status, code) in [
        ("limit=0", 422, "invalid_value"),
        ("limit=1001", 422, "invalid_value"),
        ("before=0", 422, "invalid_value"),
        ("limit=ten", 400, "invalid_query"),
        ("limit=1.5", 400, "invalid_query"),
        ("before=99999999999999999999", 400, "invalid_query"),
        ("limit=%ZZ", 400, "invalid_query"),
    ] {
        let (s, c, _) = page(query.into()).await;
        assert_eq!((s, c.as_str()), (status, code), "?{query}");
    }
    // 401 before the query is read; 403 after it.
    let r = api
        .get(&format!("/accounts/{a}/transfers?limit=ten"), None)
        .await;
    assert_eq!(r.status, 401);
    let r = api
        .get(&format!("/accounts/{a}/transfers?limit=ten"), Some(&tb))
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_query".to_string()));
    let r = api
        .get(&format!("/accounts/{a}/transfers?limit=1"), Some(&tb))
        .await;
    assert_eq!(r.status, 403);

    let r = api
        .post(
            "/products",
            ADMIN,
            json!({"sku": "widget", "stock": 10, "price": 25}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.json(),
        json!({"sku": "widget", "stock": 10, "price": 25, "version": 0})
    );
    let r = api.get("/products/widget", None).await;
    assert_eq!(r.json()["stock"], 10);
    let r = api
        .post(
            "/orders",
            &ta,
            json!({"account": a, "sku": "widget", "quantity": 4}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let oid = r.id();
    assert_eq!(
        r.json(),
        json!({"id": oid, "account": a, "sku": "widget", "quantity": 4, "total": 100})
    );
    assert_eq!(api.get("/products/widget", None).await.json()["stock"], 6);
    assert_eq!(api.balance(a).await, 1000);

    let r = api
        .post("/events", ADMIN, json!({"name": "concert", "seats": 5}))
        .await;
    assert_eq!(r.status, 201);
    let ev = r.id();
    assert_eq!(r.json(), json!({"id": ev, "name": "concert", "seats": 5}));
    let r = api
        .post(
            &format!("/events/{ev}/bookings"),
            &tb,
            json!({"account": b, "seat": 3}),
        )
        .await;
    assert_eq!(r.status, 201);
    let bid = r.id();
    assert_eq!(
        r.json(),
        json!({"id": bid, "event": ev, "seat": 3, "account": b})
    );

    let audit = api.audit().await;
    assert_eq!(audit["consistent"], true, "{audit}");
    assert_eq!(audit["accounts"], 3);
    assert_eq!(audit["total_balance"], audit["expected_total_balance"]);

    // --- bad inputs: status, code, and nothing changed -----------------------------------
    let before = snapshot(&api, &[a, b, c], "widget", ev).await;
    let big = "x".repeat(1024 * 1024);
    let long65 = "y".repeat(65);
    let long129 = "z".repeat(129);
    let key256 = "k".repeat(256);
    let pa = format!("/accounts/{a}");
    let pb = format!("/accounts/{b}");
    let dep = format!("{pa}/deposit");
    let wd = format!("{pa}/withdraw");
    let book = format!("/events/{ev}/bookings");
    let tb_bearer = format!("Bearer {tb}");
    let dep_zero = format!("/accounts/0{a}/deposit");
    let wd_plus = format!("/accounts/+{a}/withdraw");
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Vec<(&'a str, &'a str)>,
        Option<Vec<u8>>,
        u16,
        &'a str,
    );
    let j = |s: &str| Some(s.as_bytes().to_vec());
    let cases: Vec<Case> = vec![
        // 413 / 415
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            Some(format!("{{\"owner\":\"{big}\"}}").into_bytes()),
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![("Content-Type", "text/plain")],
            j(r#"{"owner":"x"}"#),
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/accounts",
            None,
            vec![("Content-Type", "application/xml")],
            j(r#"{"owner":"x"}"#),
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![("Content-Type", "")],
            j(r#"{"amount":1}"#),
            415,
            "unsupported_media_type",
        ),
        // 401
        (
            "POST",
            "/accounts",
            None,
            vec![],
            j(r#"{"owner":"x"}"#),
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/accounts",
            Some("wrong-token"),
            vec![],
            j(r#"{"owner":"x"}"#),
            401,
            "unauthorized",
        ),
        (
            "POST",
            &dep,
            None,
            vec![],
            j("{not json"),
            401,
            "unauthorized",
        ),
        ("GET", &pa, None, vec![], None, 401, "unauthorized"),
        (
            "GET",
            "/audit",
            Some("acct_deadbeef"),
            vec![],
            None,
            401,
            "unauthorized",
        ),
        // 400: malformed bodies
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j("{"),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": 5}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": "x", "balance": 1.0}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": "x", "balance": 1e3}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": "x", "balance": 99999999999999999999}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": null}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": "x", "balance": null}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"balance": 5}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": "x", "admin": true}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"[]"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j("null"),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(""),
            400,
            "invalid_body",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 1.5}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": "10"}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 1} trailing"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 1, "amount": 2}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": -9223372036854775809}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/transfers",
            Some(&ta),
            vec![],
            j(r#"{"from": 1, "to": 2}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/orders",
            Some(&ta),
            vec![],
            j(r#"{"account": 1, "sku": "widget", "quantity": 2.0}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/accounts/abc/deposit",
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 1}"#),
            400,
            "invalid_path",
        ),
        (
            "GET",
            "/accounts/1.5",
            Some(ADMIN),
            vec![],
            None,
            400,
            "invalid_path",
        ),
        (
            "POST",
            "/events/x/bookings",
            Some(&ta),
            vec![],
            j(r#"{"account": 1, "seat": 1}"#),
            400,
            "invalid_path",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![("Idempotency-Key", &key256)],
            j(r#"{"amount": 1}"#),
            400,
            "invalid_idempotency_key",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![("X-Concurrency-Strategy", "yolo")],
            j(r#"{"amount": 1}"#),
            400,
            "unknown_strategy",
        ),
        // 403
        (
            "POST",
            "/accounts",
            Some(&ta),
            vec![],
            j(r#"{"owner": "x"}"#),
            403,
            "forbidden",
        ),
        (
            "POST",
            &dep,
            Some(&ta),
            vec![],
            j(r#"{"amount": 1}"#),
            403,
            "forbidden",
        ),
        (
            "POST",
            &wd,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 1}"#),
            403,
            "forbidden",
        ),
        (
            "POST",
            &wd,
            Some(&tb),
            vec![],
            j(r#"{"amount": 1}"#),
            403,
            "forbidden",
        ),
        (
            "POST",
            "/transfers",
            Some(&tb),
            vec![],
            j(&format!(r#"{{"from": {a}, "to": {b}, "amount": 1}}"#)),
            403,
            "forbidden",
        ),
        (
            "POST",
            "/transfers",
            Some(ADMIN),
            vec![],
            j(&format!(r#"{{"from": {a}, "to": {b}, "amount": 1}}"#)),
            403,
            "forbidden",
        ),
        (
            "POST",
            "/transfers",
            Some(&ta),
            vec![],
            j(&format!(r#"{{"from": 999999, "to": {b}, "amount": 1}}"#)),
            403,
            "forbidden",
        ),
        ("GET", &pb, Some(&ta), vec![], None, 403, "forbidden"),
        ("GET", "/audit", Some(&ta), vec![], None, 403, "forbidden"),
        (
            "POST",
            "/orders",
            Some(&tb),
            vec![],
            j(&format!(
                r#"{{"account": {a}, "sku": "widget", "quantity": 1}}"#
            )),
            403,
            "forbidden",
        ),
        (
            "POST",
            &book,
            Some(ADMIN),
            vec![],
            j(&format!(r#"{{"account": {a}, "seat": 1}}"#)),
            403,
            "forbidden",
        ),
        // 404
        (
            "POST",
            "/accounts/999999/deposit",
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 0}"#),
            404,
            "account_not_found",
        ),
        (
            "GET",
            "/accounts/999999",
            Some(ADMIN),
            vec![],
            None,
            404,
            "account_not_found",
        ),
        (
            "POST",
            "/transfers",
            Some(&ta),
            vec![],
            j(&format!(r#"{{"from": {a}, "to": 999999, "amount": 0}}"#)),
            404,
            "account_not_found",
        ),
        (
            "POST",
            "/orders",
            Some(&ta),
            vec![],
            j(&format!(
                r#"{{"account": {a}, "sku": "nope", "quantity": 0}}"#
            )),
            404,
            "product_not_found",
        ),
        (
            "POST",
            "/orders",
            Some(&ta),
            vec![],
            j(&format!(
                r#"{{"account": {a}, "sku": "{long65}", "quantity": 1}}"#
            )),
            404,
            "product_not_found",
        ),
        (
            "GET",
            "/products/nope",
            None,
            vec![],
            None,
            404,
            "product_not_found",
        ),
        (
            "POST",
            "/events/999999/bookings",
            Some(&ta),
            vec![],
            j(&format!(r#"{{"account": {a}, "seat": 0}}"#)),
            404,
            "event_not_found",
        ),
        (
            "GET",
            "/no/such/endpoint",
            None,
            vec![],
            None,
            404,
            "not_found",
        ),
        // 422
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": "x", "balance": -1}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": "x", "balance": 1000000000000001}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": ""}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(&format!(r#"{{"owner": "{long65}"}}"#)),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/accounts",
            Some(ADMIN),
            vec![],
            j(r#"{"owner": "nul\u0000byte"}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 0}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": -5}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 1000000000000000}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            &wd,
            Some(&ta),
            vec![],
            j(r#"{"amount": 1000000000000001}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/transfers",
            Some(&ta),
            vec![],
            j(&format!(r#"{{"from": {a}, "to": {b}, "amount": 0}}"#)),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/transfers",
            Some(&ta),
            vec![],
            j(&format!(
                r#"{{"from": {a}, "to": {b}, "amount": 9223372036854775807}}"#
            )),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/transfers",
            Some(&ta),
            vec![],
            j(&format!(r#"{{"from": {a}, "to": {a}, "amount": 5}}"#)),
            422,
            "same_account",
        ),
        (
            "POST",
            "/products",
            Some(ADMIN),
            vec![],
            j(r#"{"sku": "p0", "stock": 1, "price": 0}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/products",
            Some(ADMIN),
            vec![],
            j(r#"{"sku": "p1", "stock": -1, "price": 1}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/products",
            Some(ADMIN),
            vec![],
            j(&format!(r#"{{"sku": "{long65}", "stock": 1, "price": 1}}"#)),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/products",
            Some(ADMIN),
            vec![],
            j(r#"{"sku": "", "stock": 1, "price": 1}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/orders",
            Some(&ta),
            vec![],
            j(&format!(
                r#"{{"account": {a}, "sku": "widget", "quantity": 0}}"#
            )),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/orders",
            Some(&ta),
            vec![],
            j(&format!(
                r#"{{"account": {a}, "sku": "widget", "quantity": 1000001}}"#
            )),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/events",
            Some(ADMIN),
            vec![],
            j(r#"{"name": "e", "seats": 0}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/events",
            Some(ADMIN),
            vec![],
            j(r#"{"name": "e", "seats": 100001}"#),
            422,
            "invalid_value",
        ),
        (
            "POST",
            "/events",
            Some(ADMIN),
            vec![],
            j(&format!(r#"{{"name": "{long129}", "seats": 1}}"#)),
            422,
            "invalid_value",
        ),
        (
            "POST",
            &book,
            Some(&ta),
            vec![],
            j(&format!(r#"{{"account": {a}, "seat": 0}}"#)),
            422,
            "invalid_value",
        ),
        (
            "POST",
            &book,
            Some(&ta),
            vec![],
            j(&format!(r#"{{"account": {a}, "seat": 6}}"#)),
            422,
            "invalid_value",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![("X-Concurrency-Strategy", "redis")],
            j(r#"{"amount": 1}"#),
            422,
            "strategy_unsupported",
        ),
        // 409
        (
            "POST",
            &wd,
            Some(&ta),
            vec![],
            j(r#"{"amount": 1000001}"#),
            409,
            "insufficient_funds",
        ),
        (
            "POST",
            "/transfers",
            Some(&tb),
            vec![],
            j(&format!(r#"{{"from": {b}, "to": {a}, "amount": 201}}"#)),
            409,
            "insufficient_funds",
        ),
        (
            "POST",
            "/products",
            Some(ADMIN),
            vec![],
            j(r#"{"sku": "widget", "stock": 1, "price": 1}"#),
            409,
            "sku_exists",
        ),
        (
            "POST",
            "/orders",
            Some(&ta),
            vec![],
            j(&format!(
                r#"{{"account": {a}, "sku": "widget", "quantity": 7}}"#
            )),
            409,
            "out_of_stock",
        ),
        (
            "POST",
            "/orders",
            Some(&tb),
            vec![],
            j(&format!(
                r#"{{"account": {b}, "sku": "widget", "quantity": 7}}"#
            )),
            409,
            "out_of_stock",
        ),
        (
            "POST",
            &book,
            Some(&ta),
            vec![],
            j(&format!(r#"{{"account": {a}, "seat": 3}}"#)),
            409,
            "seat_taken",
        ),
        // Headers sent twice are ambiguous (a proxy in front may read the other one): refused,
        // not decided by whichever comes first.
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![("Authorization", &tb_bearer)],
            j(r#"{"amount": 1}"#),
            401,
            "unauthorized",
        ),
        (
            "GET",
            &pb,
            Some(&tb),
            vec![("Authorization", "Bearer not-a-token")],
            None,
            401,
            "unauthorized",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![
                ("X-Concurrency-Strategy", "atomic"),
                ("X-Concurrency-Strategy", "none"),
            ],
            j(r#"{"amount": 1}"#),
            400,
            "unknown_strategy",
        ),
        (
            "POST",
            &dep,
            Some(ADMIN),
            vec![
                ("Content-Type", "application/json"),
                ("Content-Type", "text/plain"),
            ],
            j(r#"{"amount": 1}"#),
            415,
            "unsupported_media_type",
        ),
        // Path parameters whose percent-escapes are not UTF-8: a JSON 400 like any bad id.
        (
            "GET",
            "/accounts/%ff",
            Some(ADMIN),
            vec![],
            None,
            400,
            "invalid_path",
        ),
        (
            "GET",
            "/accounts/%ff/transfers",
            Some(ADMIN),
            vec![],
            None,
            400,
            "invalid_path",
        ),
        (
            "POST",
            "/accounts/%ff/deposit",
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 1}"#),
            400,
            "invalid_path",
        ),
        (
            "POST",
            "/accounts/%C3%28/withdraw",
            Some(&ta),
            vec![],
            j(r#"{"amount": 1}"#),
            400,
            "invalid_path",
        ),
        (
            "POST",
            "/events/%ff/bookings",
            Some(&ta),
            vec![],
            j(&format!(r#"{{"account": {a}, "seat": 1}}"#)),
            400,
            "invalid_path",
        ),
        (
            "GET",
            "/products/%ff",
            None,
            vec![],
            None,
            400,
            "invalid_path",
        ),
        // Other spellings of an id would alias the account under another path.
        (
            "POST",
            &dep_zero,
            Some(ADMIN),
            vec![],
            j(r#"{"amount": 1}"#),
            400,
            "invalid_path",
        ),
        (
            "POST",
            &wd_plus,
            Some(&ta),
            vec![],
            j(r#"{"amount": 1}"#),
            400,
            "invalid_path",
        ),
    ];
    assert!(cases.len() >= 40);
    for (method, path, token, headers, body, status, code) in &cases {
        let r = api
            .send(method, path, *token, headers, body.as_deref())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(
            (r.status, r.code()),
            (*status, code.to_string()),
            "{method} {path} {:?}: {}",
            body.as_ref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned()),
            String::from_utf8_lossy(&r.body)
        );
        if *status == 503 || *status == 409 && *code == "request_in_progress" {
            assert!(r.header("retry-after").is_some());
        }
    }
    let after = snapshot(&api, &[a, b, c], "widget", ev).await;
    assert_eq!(before, after, "a rejected request changed state");

    // price * quantity beyond 10^15 (a product priced at the maximum).
    let r = api
        .post(
            "/products",
            ADMIN,
            json!({"sku": "gold", "stock": 5, "price": 1_000_000_000_000_000i64}),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = api
        .post(
            "/orders",
            &ta,
            json!({"account": a, "sku": "gold", "quantity": 2}),
        )
        .await;
    expect(&r, 422, "invalid_value");
    let r = api
        .post(
            "/orders",
            &ta,
            json!({"account": a, "sku": "gold", "quantity": 1}),
        )
        .await;
    expect(&r, 409, "insufficient_funds");
    // A deposit that would pass 10^15.
    let r = api
        .post(
            &format!("/accounts/{c}/deposit"),
            ADMIN,
            json!({"amount": 1_000_000_000_000_000i64}),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = api
        .post(
            &format!("/accounts/{c}/deposit"),
            ADMIN,
            json!({"amount": 1}),
        )
        .await;
    expect(&r, 422, "invalid_value");

    // --- check order -------------------------------------------------------------------
    // 415 before 401; 401 before 400; 400 before 403; 403 before 404; 404 before 422; 422 before 409.
    let r = api
        .send(
            "POST",
            &wd,
            None,
            &[("Content-Type", "text/plain")],
            Some(b"{"),
        )
        .await
        .unwrap();
    expect(&r, 415, "unsupported_media_type");
    let r = api.send("POST", &wd, None, &[], Some(b"{")).await.unwrap();
    expect(&r, 401, "unauthorized");
    let r = api
        .send("POST", &wd, Some(&tb), &[], Some(b"{"))
        .await
        .unwrap();
    expect(&r, 400, "invalid_body");
    let r = api
        .post("/accounts/999999/withdraw", &ta, json!({"amount": 0}))
        .await;
    expect(&r, 403, "forbidden");
    let r = api
        .post("/accounts/999999/deposit", ADMIN, json!({"amount": -1}))
        .await;
    expect(&r, 404, "account_not_found");
    let r = api
        .post("/transfers", &tb, json!({"from": b, "to": a, "amount": 0}))
        .await;
    expect(&r, 422, "invalid_value");

    // --- strategies by header ------------------------------------------------------------
    let r = api
        .post(
            "/products",
            ADMIN,
            json!({"sku": "gadget", "stock": 100, "price": 1}),
        )
        .await;
    assert_eq!(r.status, 201);
    for s in [
        "none",
        "mutex",
        "atomic",
        "pessimistic",
        "optimistic",
        "serializable",
        "advisory",
        "batched",
    ] {
        let r = api
            .post_with(
                &dep,
                ADMIN,
                &[("X-Concurrency-Strategy", s)],
                json!({"amount": 1}),
            )
            .await;
        if s == "advisory" && kind == Kind::Sqlite {
            expect(&r, 422, "strategy_unsupported");
        } else {
            assert_eq!(r.status, 200, "{s}: {}", String::from_utf8_lossy(&r.body));
        }
        let r = api
            .post_with(
                "/transfers",
                &ta,
                &[("X-Concurrency-Strategy", s)],
                json!({"from": a, "to": b, "amount": 1}),
            )
            .await;
        assert!(
            r.status == 201 || (s == "advisory" && kind == Kind::Sqlite),
            "{s}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let r = api
            .post_with(
                "/orders",
                &ta,
                &[("X-Concurrency-Strategy", s)],
                json!({"account": a, "sku": "gadget", "quantity": 1}),
            )
            .await;
        assert!(
            r.status == 201 || (s == "advisory" && kind == Kind::Sqlite),
            "{s}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let audit = api.audit().await;
    assert_eq!(audit["consistent"], true, "{audit}");

    // A seat booked under one strategy is taken under every other (`atomic` claims seats in a
    // table of its own; it must still see the bookings of the others, made one after another).
    let strategies: Vec<&str> = ["none", "mutex", "atomic", "pessimistic", "optimistic"]
        .into_iter()
        .chain(["serializable", "advisory", "batched"])
        .filter(|s| !(*s == "advisory" && kind == Kind::Sqlite))
        .collect();
    let r = api
        .post(
            "/events",
            ADMIN,
            json!({"name": "mixed", "seats": strategies.len()}),
        )
        .await;
    let mixed = format!("/events/{}/bookings", r.id());
    for (seat, first) in strategies.iter().enumerate() {
        let body = json!({"account": a, "seat": seat + 1});
        let r = api
            .post_with(
                &mixed,
                &ta,
                &[("X-Concurrency-Strategy", first)],
                body.clone(),
            )
            .await;
        assert_eq!(
            r.status,
            201,
            "{first}: {}",
            String::from_utf8_lossy(&r.body)
        );
        for then in &strategies {
            let r = api
                .post_with(
                    &mixed,
                    &ta,
                    &[("X-Concurrency-Strategy", then)],
                    body.clone(),
                )
                .await;
            assert_eq!(
                (r.status, r.code_or_empty()),
                (409, "seat_taken".to_string()),
                "seat booked under {first}, then under {then}"
            );
        }
    }
    let audit = api.audit().await;
    assert_eq!(audit["double_booked_seats"], 0, "{audit}");

    // --- idempotency ---------------------------------------------------------------------
    idempotency(&api, a, b, &ta).await;

    // --- documents -----------------------------------------------------------------------
    let r = api.get("/openapi.json", None).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/accounts",
        "/accounts/{id}",
        "/accounts/{id}/deposit",
        "/accounts/{id}/withdraw",
        "/transfers",
        "/accounts/{id}/transfers",
        "/products",
        "/products/{sku}",
        "/orders",
        "/events",
        "/events/{id}/bookings",
        "/audit",
        "/healthz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi.json lacks {path}");
    }
    let r = api.get("/metrics", None).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    assert!(
        text.contains(
            "contend_http_requests_total{method=\"POST\",route=\"/transfers\",status=\"201\"}"
        ),
        "{text}"
    );
    assert!(text.contains("contend_http_request_duration_seconds_bucket"));
    assert!(text.contains("contend_tx_attempts_total{strategy=\"atomic\"}"));
    assert!(
        r.headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/plain"))
    );
    let r = api.get("/healthz", None).await;
    assert!(r.header("x-request-id").is_some());

    server.stop().await;
    db.drop_db().await;
}

async fn idempotency(api: &Api, a: i64, b: i64, ta: &str) {
    let before = api.balance(a).await;
    let body = json!({"from": a, "to": b, "amount": 7});
    let key = format!("transfer-{}", rand_suffix());
    let first = api
        .post_with("/transfers", ta, &[("Idempotency-Key", &key)], body.clone())
        .await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), None);
    let again = api
        .post_with("/transfers", ta, &[("Idempotency-Key", &key)], body.clone())
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body, "replay must be byte for byte");
    assert_eq!(api.balance(a).await, before - 7, "executed once");
    // Same key, different body: 422.
    let r = api
        .post_with(
            "/transfers",
            ta,
            &[("Idempotency-Key", &key)],
            json!({"from": a, "to": b, "amount": 8}),
        )
        .await;
    expect(&r, 422, "idempotency_key_reused");
    // Same key by another caller: its own scope.
    let r = api
        .post_with(
            &format!("/accounts/{a}/deposit"),
            ADMIN,
            &[("Idempotency-Key", &key)],
            json!({"amount": 3}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("idempotent-replayed"), None);
    // Stored conflicts replay too; 400/403 are not stored.
    let key2 = format!("big-{}", rand_suffix());
    let huge = json!({"from": a, "to": b, "amount": 999_999_999});
    let r1 = api
        .post_with(
            "/transfers",
            ta,
            &[("Idempotency-Key", &key2)],
            huge.clone(),
        )
        .await;
    expect(&r1, 409, "insufficient_funds");
    let r2 = api
        .post_with("/transfers", ta, &[("Idempotency-Key", &key2)], huge)
        .await;
    assert_eq!(
        (r2.status, r2.header("idempotent-replayed")),
        (409, Some("true"))
    );
    assert_eq!(r1.body, r2.body);
    let key3 = format!("forbidden-{}", rand_suffix());
    let wd = format!("/accounts/{a}/withdraw");
    let r = api
        .post_with(
            &wd,
            ADMIN,
            &[("Idempotency-Key", &key3)],
            json!({"amount": 1}),
        )
        .await;
    expect(&r, 403, "forbidden");
    let r = api
        .post_with(&wd, ta, &[("Idempotency-Key", &key3)], json!({"amount": 1}))
        .await;
    assert_eq!(
        (r.status, r.header("idempotent-replayed")),
        (200, None),
        "a 403 is not stored"
    );
    let key4 = format!("bad-{}", rand_suffix());
    let r = api
        .send(
            "POST",
            &wd,
            Some(ta),
            &[("Idempotency-Key", &key4)],
            Some(b"{\"amount\": 1.5}"),
        )
        .await
        .unwrap();
    expect(&r, 400, "invalid_body");
    let r = api
        .post_with(&wd, ta, &[("Idempotency-Key", &key4)], json!({"amount": 1}))
        .await;
    assert_eq!(
        (r.status, r.header("idempotent-replayed")),
        (200, None),
        "a 400 is not stored"
    );

    // Concurrent duplicates: exactly one execution, every other answer a byte-identical replay
    // or 409 request_in_progress.
    let before = api.balance(a).await;
    let key5 = format!("dup-{}", rand_suffix());
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let api = *api;
        let key = key5.clone();
        let ta = ta.to_string();
        tasks.push(tokio::spawn(async move {
            api.post_with(
                "/transfers",
                &ta,
                &[("Idempotency-Key", &key)],
                json!({"from": a, "to": b, "amount": 11}),
            )
            .await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let originals: Vec<&Resp> = results
        .iter()
        .filter(|r| r.status == 201 && r.header("idempotent-replayed").is_none())
        .collect();
    assert_eq!(originals.len(), 1, "exactly one execution");
    for r in &results {
        match r.status {
            201 => assert_eq!(r.body, originals[0].body),
            409 => {
                expect(r, 409, "request_in_progress");
                assert!(r.header("retry-after").is_some());
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    let replay = api
        .post_with(
            "/transfers",
            ta,
            &[("Idempotency-Key", &key5)],
            json!({"from": a, "to": b, "amount": 11}),
        )
        .await;
    assert_eq!(replay.body, originals[0].body);
    assert_eq!(api.balance(a).await, before - 11);
}

fn rand_suffix() -> u64 {
    use rand::Rng;
    rand::rng().random()
}
