//! The README tells the truth: its commands exist, its defaults table is
//! the one the code uses, CI runs the README's test command.

use std::path::Path;

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

#[test]
fn readme_opens_with_the_demo_and_test_commands_and_ci_runs_the_latter() {
    let r = readme();
    let first_block = r.split("```sh").nth(1).unwrap().split("```").next().unwrap();
    assert!(first_block.contains("./scripts/demo"), "{first_block}");
    assert!(first_block.contains("./scripts/test"), "{first_block}");
    assert!(root().join("scripts/demo").exists() && root().join("scripts/test").exists());
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    assert!(ci.contains("./scripts/test"), "{ci}");
}

#[test]
fn readme_states_the_defaults_the_code_uses() {
    assert!(
        readme().contains(nonstop_spec::defaults_doc()),
        "README's defaults table is out of date: paste nonstop_spec::DEFAULTS_DOC"
    );
}

#[test]
fn readme_states_the_proxy_defaults_the_code_uses() {
    assert!(
        readme().contains(nonstop_spec::proxy_defaults_doc()),
        "README's proxy defaults table is out of date: paste nonstop_spec::PROXY_DEFAULTS_DOC"
    );
}

#[test]
fn every_command_is_documented() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nonstop")).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let r = readme();
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 10, "{help}");
    for c in commands {
        assert!(r.contains(&format!("`nonstop {c}")), "README does not document `nonstop {c}`");
    }
}
