//! Builds the plugins in `../plugins` for wasm32-wasip2 and tells the crate (tests, demo)
//! where the `.wasm` files are: `WEIR_PLUGIN_DIR`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let plugins = manifest.join("../plugins");
    println!("cargo:rerun-if-changed={}", plugins.display());
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../wit").display()
    );
    println!("cargo:rerun-if-env-changed=WEIR_SKIP_PLUGIN_BUILD");

    // <target>/<profile>/build/weir-<hash>/out -> <target>/plugins: a separate target
    // folder, so the nested cargo does not wait on the lock this build holds.
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target = out
        .ancestors()
        .nth(4)
        .expect("OUT_DIR is inside the target folder")
        .join("plugins");
    let wasm_dir = target.join("wasm32-wasip2").join("release");
    println!("cargo:rustc-env=WEIR_PLUGIN_DIR={}", wasm_dir.display());
    if std::env::var_os("WEIR_SKIP_PLUGIN_BUILD").is_some() {
        return;
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(plugins.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target);
    // A plain build: not clippy's wrapper, not this build's flags.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo to build the plugins");
    if !status.success() {
        panic!(
            "building the plugins in {} failed. If the wasm32-wasip2 target is missing, run \
             `rustup target add wasm32-wasip2`",
            plugins.display()
        );
    }
}
