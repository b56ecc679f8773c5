//! The curl examples of README.md and API.md work: each is run with bash against a fresh
//! service (SQLite), and every trailing `# expectation` comment is checked against the output
//! (`...` stands for anything; a leading status code is the reader's hint and not printed by
//! curl; header names are compared without case, as HTTP does).

mod common;

use std::path::Path;

use common::{ADMIN, Kind, Options, Server, TestDb};

/// The first ```sh block after `heading`, from its first line that starts with `from` on.
fn sh_block(file: &str, heading: &str, from: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    let after = text
        .split_once(heading)
        .unwrap_or_else(|| panic!("{file}: no `{heading}`"))
        .1;
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .unwrap_or_else(|| panic!("{file}: no sh block after `{heading}`"))
        .0;
    let start = block
        .find(from)
        .unwrap_or_else(|| panic!("{file}: the block has no `{from}`"));
    block[start..].to_string()
}

/// The expectations of a script: the trailing comments of its command lines, as fragments that
/// must all appear in the output.
fn expectations(script: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in script.lines() {
        let code = line.trim_start();
        if code.starts_with('#') {
            continue;
        }
        let Some((_, comment)) = line.rsplit_once("  # ") else {
            continue;
        };
        let comment = comment.trim();
        // "409 {...}": the status is for the reader.
        let comment = match comment.split_once(' ') {
            Some((status, rest)) if status.len() == 3 && status.parse::<u16>().is_ok() => rest,
            _ => comment,
        };
        let fragments: Vec<String> = comment
            .split("...")
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        if !fragments.is_empty() {
            out.push((comment.to_string(), fragments));
        }
    }
    out
}

async fn run_examples(script: &str, what: &str) {
    let db = TestDb::new(Kind::Sqlite).await;
    let server = Server::start(&db.url, Options::default()).await;
    let address = format!("http://{}", server.api().addr);
    let documented = "ADMIN=secret; S=http://127.0.0.1:8080";
    assert!(
        script.contains(documented),
        "{what}: the examples set `{documented}`"
    );
    let script = script.replace(documented, &format!("ADMIN={ADMIN}; S={address}"));
    let output = tokio::process::Command::new("bash")
        .arg("-e")
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .expect("bash (and curl) must be installed: scripts/services install adds curl");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what}: the examples failed: {stderr}\n{stdout}"
    );
    let haystack = stdout.to_ascii_lowercase();
    let expected = expectations(&script);
    assert!(expected.len() >= 3, "{what}: too few expectations to check");
    for (comment, fragments) in expected {
        for fragment in fragments {
            assert!(
                haystack.contains(&fragment),
                "{what}: the output lacks `{fragment}` (from `# {comment}`):\n{stdout}"
            );
        }
    }
    let audit = server.api().audit().await;
    assert_eq!(audit["consistent"], true, "{what}: {audit}");
    server.stop().await;
    db.drop_db().await;
}

#[test]
fn expectations_are_read_from_trailing_comments() {
    let found = expectations(
        "# a heading comment\ncurl a   # 409 {\"code\":\"x\",...}\ncurl b\necho 'c'  # Idempotent-Replayed: true\n",
    );
    assert_eq!(
        found.iter().map(|(_, f)| f.clone()).collect::<Vec<_>>(),
        vec![
            vec!["{\"code\":\"x\",".to_string(), "}".to_string()],
            vec!["idempotent-replayed: true".to_string()],
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_curl_examples_work() {
    let script = sh_block(
        "../../README.md",
        "## The reference service: `contend serve`",
        "ADMIN=secret",
    );
    run_examples(&script, "README.md").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_walk_through_works() {
    let script = sh_block("API.md", "## curl walk-through", "ADMIN=secret");
    run_examples(&script, "API.md").await;
}
