//! `/openapi.json`: the OpenAPI 3 document, generated from the handlers' annotations and the
//! body types (utoipa), never written by hand.

use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The API document.
#[derive(OpenApi)]
#[openapi(
    info(title = "contend service", description = "Bank, shop and booking, safe under concurrency. \
        Errors are {\"error\": {\"code\", \"message\"}}. POSTs accept Idempotency-Key; \
        X-Concurrency-Strategy picks a strategy when the server allows it."),
    paths(
        crate::bank::create_account,
        crate::bank::get_account,
        crate::bank::deposit,
        crate::bank::withdraw,
        crate::bank::create_transfer,
        crate::bank::list_transfers,
        crate::shop::create_product,
        crate::shop::get_product,
        crate::shop::create_order,
        crate::booking::create_event,
        crate::booking::create_booking,
        crate::audit::audit,
        crate::audit::healthz,
        crate::metrics_text,
        openapi_json,
    ),
    components(schemas(crate::error::ErrorBody, crate::error::ErrorDetail)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `GET /openapi.json`
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "this document")))]
pub async fn openapi_json() -> Response {
    match ApiDoc::openapi().to_json() {
        Ok(json) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        Err(e) => crate::error::ApiError::internal(e).into_response(),
    }
}
