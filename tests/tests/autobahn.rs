//! The Autobahn|Testsuite fuzzing client against the gateway's real WebSocket front over
//! wss (a test-only echo endpoint), with results compared to pinned expectations.
//!
//! Needs CPython 2.7 (the image has it under pyenv: `$(pyenv root)/versions/2.7.18`) and
//! installs `autobahntestsuite==25.10.1` into `target/autobahn` on first use.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use gateway_tests::*;
use serde_json::{json, Value};

const VERSION: &str = "autobahntestsuite==25.10.1";

fn python2() -> PathBuf {
    let root = Command::new("pyenv")
        .arg("root")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "/root/.pyenv".into());
    let python = Path::new(&root).join("versions/2.7.18/bin/python");
    assert!(
        python.exists(),
        "the Autobahn|Testsuite needs CPython 2.7.18 at {} (pyenv install 2.7.18); it is not \
         skipped when missing",
        python.display()
    );
    python
}

fn ensure_installed(python: &Path, dir: &Path) {
    if dir.join("autobahntestsuite").exists() {
        return;
    }
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(dir)
        .arg(VERSION)
        .status()
        .expect("pip runs");
    assert!(
        status.success(),
        "installing {VERSION} into {} failed",
        dir.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_fuzzingclient_results_match_the_pinned_expectations() {
    within(1500, async {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join("target/autobahn");
        let python = python2();
        ensure_installed(&python, &dir);

        let gw = TestGateway::start(
            "[[endpoint]]\npath = \"/echo\"\nauth = \"none\"\necho = true\nmax_message_bytes = 16777216\n\
             rate_per_sec = 100000\nrate_burst = 100000\n",
        )
        .await;
        let work = tempfile::tempdir().unwrap();
        let reports = work.path().join("reports");
        let spec = json!({
            "outdir": reports,
            "servers": [{"agent": "gateway", "url": gw.wss_url("/echo")}],
            "cases": ["*"],
            "exclude-cases": [],
            "exclude-agent-cases": {}
        });
        let spec_path = work.path().join("fuzzingclient.json");
        std::fs::write(&spec_path, spec.to_string()).unwrap();
        let script = format!(
            "import site, sys; site.addsitedir({dir:?}); \
             sys.argv = ['wstest', '-m', 'fuzzingclient', '-s', {spec:?}]; \
             from autobahntestsuite.wstest import run; run()",
            dir = dir.display().to_string(),
            spec = spec_path.display().to_string(),
        );
        let cwd = work.path().to_owned();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(python).args(["-c", &script]).current_dir(cwd).output()
        })
        .await
        .unwrap()
        .expect("wstest runs");
        // wstest exits 0 even when cases fail: the index decides.
        let index: Value = serde_json::from_slice(
            &std::fs::read(reports.join("index.json")).unwrap_or_else(|e| {
                panic!(
                    "no index.json ({e}); wstest said: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                )
            }),
        )
        .unwrap();
        let expected: Value =
            serde_json::from_str(include_str!("../autobahn/expected.json")).unwrap();
        let pinned = expected["cases"].as_object().unwrap();
        let results = index["gateway"].as_object().expect("results for the gateway");
        assert!(results.len() > 400, "only {} cases ran", results.len());
        // Every case is compared: a pinned one must behave exactly as pinned, any other
        // must be OK. A change either way (a regression, or a pinned case now passing)
        // shows here and is settled by editing the pinned file.
        let mut differ = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for (case, r) in results {
            let behavior = r["behavior"].as_str().unwrap_or("?");
            *counts.entry(behavior.to_owned()).or_insert(0) += 1;
            let pin = pinned.get(case).or_else(|| {
                pinned
                    .iter()
                    .find(|(k, _)| k.ends_with('.') && case.starts_with(k.as_str()))
                    .map(|(_, v)| v)
            });
            let expected = pin.and_then(|p| p["behavior"].as_str()).unwrap_or("OK");
            if behavior != expected {
                differ.insert(case.clone(), format!("{behavior} (pinned {expected})"));
            }
        }
        eprintln!("Autobahn results: {counts:?}");
        assert!(differ.is_empty(), "cases that differ from the pinned file: {differ:#?}");
    })
    .await;
}
