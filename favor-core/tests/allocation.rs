//! Projection sizes whose element count fits but whose buffers cannot be allocated are typed
//! errors ([`FavorError::OutOfMemory`] naming the size), never an allocation abort.
//!
//! Whether a huge allocation fails depends on the machine's memory and overcommit policy, so
//! each case runs in a child copy of this test binary whose address space is capped at 4 GiB
//! (`ulimit -v`): there a request of 16 GiB or more fails at once, on any machine, and nothing
//! is ever touched. A cross-compiled test binary (aarch64 under qemu) is re-run through the
//! cargo runner configured for its target, so the cap applies to the emulator and its guest.

#![cfg(target_os = "linux")]

use favor_core::{FavorError, Projection, ProjectionConfig};
use std::process::Command;

const CHILD: &str = "FAVOR_TEST_ADDRESS_SPACE_LIMITED";

/// Runs `body` under the address-space cap: in this process when it is the capped child,
/// otherwise by re-running this one test in a capped child and requiring that it passed.
fn with_capped_address_space(test: &str, body: impl FnOnce()) {
    if std::env::var_os(CHILD).is_some() {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v 4194304 && exec $2 "$0" --exact "$1" --test-threads=1"#)
        .arg(exe)
        .arg(test)
        .arg(runner_for_this_target())
        .env(CHILD, "1")
        .output()
        .expect("spawn sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in a capped child: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `CARGO_TARGET_<triple>_RUNNER` command for this binary's architecture when one is set
/// (an emulator for a cross-compiled test), else empty: the binary then runs directly.
fn runner_for_this_target() -> String {
    let prefix = format!("CARGO_TARGET_{}_", std::env::consts::ARCH.to_uppercase());
    std::env::vars()
        .find(|(key, _)| key.starts_with(&prefix) && key.ends_with("_RUNNER"))
        .map(|(_, runner)| runner)
        .unwrap_or_default()
}

fn out_of_memory(config: ProjectionConfig, want_elements: usize) {
    match Projection::draw(config) {
        Err(FavorError::OutOfMemory { arg: "w", elements, bytes }) => {
            assert_eq!(elements, want_elements, "{config:?}");
            assert!(bytes >= 4 * elements);
        }
        other => panic!("{config:?}: expected OutOfMemory, got {other:?}"),
    }
}

#[test]
fn projections_too_large_to_allocate_are_errors() {
    with_capped_address_space("projections_too_large_to_allocate_are_errors", || {
        // m = 2^40, d = 64: 2^46 entries (512 TiB as f64).
        out_of_memory(ProjectionConfig::new(1 << 40, 64, 1), 1 << 46);
        out_of_memory(ProjectionConfig::new(1 << 40, 64, 1).iid(), 1 << 46);
        // m = 2^26, d = 64, iid: 16 GiB of f32.
        out_of_memory(ProjectionConfig::new(1 << 26, 64, 1).iid(), 1 << 32);
        // m = 1, d = 2^40 (iid; an orthogonal draw needs a d×d block, whose count overflows).
        out_of_memory(ProjectionConfig::new(1, 1 << 40, 1).iid(), 1 << 40);
        // The process is intact: a small draw still works.
        assert!(Projection::draw(ProjectionConfig::new(8, 4, 1)).is_ok());
    });
}
