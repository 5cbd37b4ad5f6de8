//! Export descriptions (issue 14, item 4): `NBD_OPT_LIST` and
//! `NBD_INFO_DESCRIPTION` say what each export is, read by a real client
//! (`nbdinfo --list --json`, `nbdinfo --json URI`).

mod support;

use support::{ok, Daemon};

fn nbdinfo(args: &[&str]) -> serde_json::Value {
    let o = std::process::Command::new("nbdinfo")
        .args(args)
        .output()
        .expect("nbdinfo (libnbd-bin, installed by scripts/test.sh)");
    assert!(
        o.status.success(),
        "nbdinfo {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("nbdinfo JSON")
}

#[test]
fn list_and_info_describe_every_export() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("descpool");
    let p = pool.to_str().unwrap();
    ok(&["create", p, "--size", "8M"]);
    ok(&["snapshot", "create", p, "s1", "--chunk-size", "16k"]);
    let d = Daemon::start(&pool, &[]);
    let sock = d.socket();
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", sock.display());
    let list = nbdinfo(&["--list", "--json", &uri("")]);
    let exports = list["exports"].as_array().expect("exports");
    let desc = |name: &str| -> String {
        exports
            .iter()
            .find(|e| e["export-name"] == name)
            .and_then(|e| e["description"].as_str())
            .unwrap_or_else(|| panic!("no description for {name}: {list}"))
            .to_string()
    };
    assert_eq!(desc("origin"), "origin of descpool (8.0 MiB)");
    assert!(
        desc("s1").starts_with("snapshot s1 of descpool, 16 KiB chunks, "),
        "{}",
        desc("s1")
    );
    // One export's info, as NBD_OPT_GO answers it.
    let info = nbdinfo(&["--json", &uri("s1")]);
    let e = &info["exports"][0];
    assert_eq!(
        e["description"].as_str(),
        Some(desc("s1").as_str()),
        "{info}"
    );
    d.stop();
}
