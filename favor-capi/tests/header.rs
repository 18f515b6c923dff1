//! The committed header is what cbindgen generates from the sources now: a stale header fails
//! here. `FAVOR_BLESS=1 cargo test -p favor-capi --test header` rewrites it.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = crate_dir.join("include/favor.h");
    if std::env::var_os("FAVOR_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/favor.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "favor-capi/include/favor.h is stale: regenerate it with `FAVOR_BLESS=1 cargo test -p favor-capi --test header` and commit it"
    );
}
