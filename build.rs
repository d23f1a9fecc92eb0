//! Links the embedded CPython.
//!
//! Unix: an rpath to the libpython the build used, so the binary cannot silently load another
//! interpreter of the same version from the default loader path.
//!
//! Windows (mingw): `python3X.dll` is *delay-loaded*. A plain import makes the Windows loader
//! refuse to start the process when the DLL is not beside it or on `PATH`, before any of our code
//! runs, and IIS then shows only "The FastCGI process exited unexpectedly". Delay-loaded, the
//! binary starts, finds the DLL from the site's settings (`src/python/library.rs`) and, when it
//! cannot, answers every request with a 500 that says where it looked. pyo3 is told to link an
//! import library (`PYO3_USE_RAW_DYLIB=0`, set in `.cargo/config.toml`) and this script supplies a
//! delay-import one, made with mingw's `dlltool` from the export list python3-dll-a carries.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let config = pyo3_build_config::get();
    let version = config.version();
    println!("cargo:rustc-env=WFASTCGI_BUILD_PYTHON_VERSION={version}");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "windows" {
        pyo3_build_config::add_libpython_rpath_link_args();
        // Tests compare the running interpreter with the one the build used.
        if let Some(executable) = config.executable() {
            println!("cargo:rustc-env=WFASTCGI_BUILD_PYTHON={executable}");
        }
        return;
    }
    let dll = format!("python{}{}.dll", version.major, version.minor);
    println!("cargo:rustc-env=WFASTCGI_PYTHON_DLL={dll}");
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu") {
        // pyo3 reads the same variable; with raw-dylib it would import the DLL directly.
        println!("cargo:rerun-if-env-changed=PYO3_USE_RAW_DYLIB");
        assert!(
            std::env::var("PYO3_USE_RAW_DYLIB").as_deref() == Ok("0"),
            "a Windows build needs PYO3_USE_RAW_DYLIB=0 (this repository's .cargo/config.toml \
             sets it): python3X.dll is delay-loaded through the import library build.rs makes"
        );
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets the target arch");
        let library = delay_import_library(&out, &arch, (version.major, version.minor), &dll);
        println!("cargo:rustc-link-search=native={}", library.display());
    }
}

/// Writes `lib<python3X>.dll.a`, a delay-import library for `dll`, into a folder of its own
/// (so the linker cannot pick the ordinary import library python3-dll-a also writes) and
/// returns that folder.
fn delay_import_library(out: &Path, arch: &str, version: (u8, u8), dll: &str) -> PathBuf {
    let defs = out.join("python-def");
    // generate() writes the .def file and an ordinary import library; only the .def is used.
    python3_dll_a::ImportLibraryGenerator::new(arch, "gnu")
        .version(Some(version))
        .generate(&defs)
        .unwrap_or_else(|e| panic!("cannot write the export list of {dll}: {e}"));
    let stem = dll.trim_end_matches(".dll");
    let folder = out.join("python-delay");
    std::fs::create_dir_all(&folder).expect("OUT_DIR is writable");
    let dlltool =
        std::env::var("DLLTOOL").unwrap_or_else(|_| format!("{arch}-w64-mingw32-dlltool"));
    // dlltool names the import descriptor after the output file: written as `python.dll.a` it is
    // `__DELAY_IMPORT_DESCRIPTOR_python_dll_a` whatever the version, which library.rs refers to.
    let status = Command::new(&dlltool)
        .current_dir(&folder)
        .arg("--input-def")
        .arg(defs.join(format!("{stem}.def")))
        .args(["--dllname", dll, "--output-delaylib", "python.dll.a"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {dlltool} (mingw-w64 binutils): {e}"));
    assert!(status.success(), "{dlltool} failed: {status}");
    std::fs::rename(
        folder.join("python.dll.a"),
        folder.join(format!("lib{stem}.dll.a")),
    )
    .expect("OUT_DIR is writable");
    folder
}
