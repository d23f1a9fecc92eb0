//! Link the binary with an rpath to the libpython it was built against, so it cannot silently
//! load another interpreter of the same version from the default loader path (see REFERENCE §5).
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
    let config = pyo3_build_config::get();
    // Tests compare the running interpreter with the one the build used.
    if let Some(version) = config.executable() {
        println!("cargo:rustc-env=WFASTCGI_BUILD_PYTHON={version}");
    }
    println!(
        "cargo:rustc-env=WFASTCGI_BUILD_PYTHON_VERSION={}",
        config.version()
    );
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
}
