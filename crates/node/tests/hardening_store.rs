//! Issue #12, finding 6: storage damage is never silent. A real `bunting serve` whose redb file
//! was truncated to 0 bytes, or had bytes flipped in its pages, refuses to start with a message
//! that names the file and `--reset-data` (no panic); with `--reset-data` it moves the damaged
//! file aside (kept, never deleted) and starts empty; an intact store is kept despite the flag.

#![allow(clippy::unwrap_used)] // test fixtures: a failed setup should panic loudly

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestNode, ADMIN};
use reqwest::Method;
use serde_json::json;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(data: &Path, reset: bool) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bunting"));
    command
        .args(["serve", "--http", "127.0.0.1:0", "--store", "redb"])
        .arg("--data-dir")
        .arg(data)
        .env("BUNTING_ADMIN_TOKEN", ADMIN)
        .env("RUST_LOG", "warn")
        .env_remove("BUNTING_RESET_DATA");
    if reset {
        // Through the environment, as a container would set it.
        command.env("BUNTING_RESET_DATA", "1");
    }
    command
}

/// Runs `bunting serve` on a damaged store: it must exit, unsuccessfully; returns its stderr.
fn refused_start(data: &Path) -> String {
    let mut child = serve(data, false)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    // Ends when the process exits (it holds the only write end).
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "started on a damaged store: {stderr}");
    stderr
}

/// Starts `bunting serve` and returns it with its URL; its stderr is drained into a buffer.
fn started(
    data: &Path,
    reset: bool,
) -> (Process, String, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut child = serve(data, reset)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push_str(&line);
            sink.lock().unwrap().push('\n');
        }
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("no listening line: {line:?} {}", log.lock().unwrap()))
        .to_owned();
    (Process(child), url, log)
}

async fn ready(http: &reqwest::Client, url: &str) {
    for _ in 0..3000 {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("bunting serve did not become ready");
}

async fn flag_value(http: &reqwest::Client, url: &str, key: &str) -> (u16, serde_json::Value) {
    let r = http
        .post(format!("{url}/ofrep/v1/evaluate/flags/{key}"))
        .bearer_auth(ADMIN)
        .json(&json!({"context": {}}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

fn assert_names_file_and_remedy(stderr: &str, file: &Path) {
    assert!(
        stderr.contains(&file.display().to_string()),
        "the message does not name {}: {stderr}",
        file.display()
    );
    assert!(stderr.contains("--reset-data"), "{stderr}");
    assert!(stderr.contains("backup"), "{stderr}");
    assert!(
        !stderr.contains("panicked"),
        "a panic instead of an error: {stderr}"
    );
}

fn damaged_copies(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("bunting.redb.damaged-")
        })
        .collect()
}

#[tokio::test]
async fn a_damaged_store_refuses_to_start_until_reset_data_moves_it_aside() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = data.join("bunting.redb");

    // A node writes a flag and stops.
    let node = TestNode::start(common::config(dir.path())).await;
    let (s, _) = node
        .call(
            Method::PUT,
            "/api/v1/flagsets/default/flags/kept",
            Some(ADMIN),
            Some(json!({"state": "ENABLED", "variants": {"v": 42}, "defaultVariant": "v"})),
        )
        .await;
    assert_eq!(s, 200);
    node.stop().await.unwrap();
    let good = std::fs::read(&file).unwrap();

    // Truncated to 0 bytes: refused, not a brand-new store.
    std::fs::write(&file, b"").unwrap();
    let stderr = refused_start(&data);
    assert_names_file_and_remedy(&stderr, &file);
    assert!(stderr.contains("empty"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "the file was changed"
    );

    // Bytes flipped in every page: refused with redb's report, no panic.
    let mut flipped = good.clone();
    for page in flipped.chunks_mut(4096) {
        for b in page.iter_mut().skip(100).take(4) {
            *b ^= 0x5A;
        }
    }
    std::fs::write(&file, &flipped).unwrap();
    let stderr = refused_start(&data);
    assert_names_file_and_remedy(&stderr, &file);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        flipped,
        "the file was changed"
    );

    // --reset-data: the damaged file is kept beside, the node starts empty.
    let http = reqwest::Client::new();
    let (process, url, log) = started(&data, true);
    ready(&http, &url).await;
    let (status, _) = flag_value(&http, &url, "kept").await;
    assert_eq!(status, 404, "a reset store starts empty");
    let copies = damaged_copies(&data);
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(std::fs::read(&copies[0]).unwrap(), flipped);
    drop(process);
    assert!(
        log.lock()
            .unwrap()
            .contains("moved the damaged store file aside"),
        "{}",
        log.lock().unwrap()
    );

    // An intact store is kept even with --reset-data (a flag left set by mistake loses nothing).
    std::fs::write(&file, &good).unwrap();
    let (process, url, _) = started(&data, true);
    ready(&http, &url).await;
    let (status, body) = flag_value(&http, &url, "kept").await;
    assert_eq!((status, body["value"].clone()), (200, json!(42)));
    drop(process);
    assert_eq!(damaged_copies(&data).len(), 1);
}
