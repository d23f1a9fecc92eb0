//! Finding `python3X.dll` on Windows.
//!
//! The DLL is delay-loaded (see `build.rs`): the process starts without it, and this module loads
//! it from the first place that has it, before anything calls into Python. Under IIS that is at
//! the first request, once the site's web.config has been read, so the site's own settings can
//! say where its Python is. Then every delay-load import is bound at once: pyo3 reads CPython's
//! data exports (`PyExc_*`, the type objects) through the import table, which a delay-load
//! thunk cannot stand in for.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::os::windows::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use windows_sys::Win32::Foundation::{GetLastError, HMODULE};
use windows_sys::Win32::System::LibraryLoader::{
    GetModuleFileNameW, LoadLibraryExW, LOAD_WITH_ALTERED_SEARCH_PATH,
};
use windows_sys::Win32::System::Registry::{
    RegGetValueW, HKEY, HKEY_CURRENT_USER, HKEY_LOCAL_MACHINE, RRF_RT_REG_SZ,
};

/// The DLL this binary was built against, e.g. `python311.dll`.
pub const DLL: &str = env!("WFASTCGI_PYTHON_DLL");

const ERROR_BAD_EXE_FORMAT: u32 = 193;

/// Where the DLL was loaded from, once it is.
static LOADED: OnceLock<PathBuf> = OnceLock::new();

/// Where to look, from the site's settings.
#[derive(Debug, Default)]
pub struct Search<'a> {
    /// `WSGI_PYTHON_HOME`: a folder holding the DLL.
    pub python_home: Option<&'a Path>,
    /// The virtualenv (`WSGI_VENV`, or the one this binary is in): its `pyvenv.cfg` names the
    /// Python it was made from.
    pub venv: Option<&'a Path>,
}

/// The folder the DLL was loaded from, if it has been.
pub fn loaded() -> Option<&'static Path> {
    LOADED.get().map(PathBuf::as_path)
}

/// Loads the DLL from the first place that has it; the error names every place tried.
pub fn load(search: &Search) -> Result<&'static Path, String> {
    if let Some(path) = loaded() {
        return Ok(path);
    }
    let mut tried = String::new();
    for (place, folder) in candidates(search) {
        let path = folder.join(DLL);
        if !path.is_file() {
            let _ = writeln!(tried, "  {place}: {} (not there)", path.display());
            continue;
        }
        match load_file(&path) {
            Ok(module) => return bind(module, path),
            Err(why) => {
                let _ = writeln!(tried, "  {place}: {} ({why})", path.display());
            }
        }
    }
    // Last, the loader's own search: the folder of the process, the system folders, PATH.
    match load_by_name() {
        Ok((module, path)) => return bind(module, path),
        Err(why) => {
            let _ = writeln!(tried, "  the Windows DLL search path (PATH): {why}");
        }
    }
    Err(format!(
        "Python cannot start: {DLL} (the CPython {} this wfastcgi was built for, 64-bit) was not found.\n\
         Looked in:\n{tried}\
         Set WSGI_PYTHON_HOME in web.config to the folder holding {DLL} (for example \
         C:\\Program Files\\Python{}), or WSGI_VENV to a virtualenv made with that Python.",
        env!("WFASTCGI_BUILD_PYTHON_VERSION"),
        DLL.trim_start_matches("python").trim_end_matches(".dll"),
    ))
}

/// The places to look, in order, each with the reason it is a candidate.
fn candidates(search: &Search) -> Vec<(String, PathBuf)> {
    let mut places = Vec::new();
    if let Some(home) = search.python_home {
        places.push(("WSGI_PYTHON_HOME".to_owned(), home.to_path_buf()));
    }
    if let Some(venv) = search.venv {
        match venv_home(venv) {
            Some(home) => places.push((
                format!("the 'home' of {}", venv.join("pyvenv.cfg").display()),
                home,
            )),
            None => places.push((
                format!(
                    "the virtualenv {} (no 'home' in its pyvenv.cfg)",
                    venv.display()
                ),
                venv.join("Scripts"),
            )),
        }
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        places.push(("the folder of wfastcgi.exe".to_owned(), exe_dir));
    }
    let key = format!(
        "Software\\Python\\PythonCore\\{}\\InstallPath",
        env!("WFASTCGI_BUILD_PYTHON_VERSION")
    );
    for (root, name) in [(HKEY_CURRENT_USER, "HKCU"), (HKEY_LOCAL_MACHINE, "HKLM")] {
        if let Some(folder) = registry_string(root, &key) {
            places.push((format!("the registry ({name}\\{key})"), folder));
        }
    }
    places
}

/// The `home` of a virtualenv's `pyvenv.cfg`: the folder of the Python it was made from.
fn venv_home(venv: &Path) -> Option<PathBuf> {
    let cfg = std::fs::read_to_string(venv.join("pyvenv.cfg")).ok()?;
    cfg.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim().eq_ignore_ascii_case("home")).then(|| PathBuf::from(value.trim()))
    })
}

fn wide(text: &OsStr) -> Vec<u16> {
    text.encode_wide().chain(Some(0)).collect()
}

fn load_file(path: &Path) -> Result<HMODULE, String> {
    // The DLL's own dependencies (vcruntime140.dll) are found in its folder.
    // SAFETY: a NUL-terminated path; the module stays loaded for the life of the process.
    let module = unsafe {
        LoadLibraryExW(
            wide(path.as_os_str()).as_ptr(),
            std::ptr::null_mut(),
            LOAD_WITH_ALTERED_SEARCH_PATH,
        )
    };
    if module.is_null() {
        return Err(load_error());
    }
    Ok(module)
}

fn load_by_name() -> Result<(HMODULE, PathBuf), String> {
    // SAFETY: a NUL-terminated name; the module stays loaded for the life of the process.
    let module = unsafe { LoadLibraryExW(wide(OsStr::new(DLL)).as_ptr(), std::ptr::null_mut(), 0) };
    if module.is_null() {
        return Err(load_error());
    }
    Ok((
        module,
        module_path(module).unwrap_or_else(|| PathBuf::from(DLL)),
    ))
}

fn load_error() -> String {
    // SAFETY: reads this thread's last error code.
    match unsafe { GetLastError() } {
        ERROR_BAD_EXE_FORMAT => "not a 64-bit DLL: a 32-bit Python cannot be used".to_owned(),
        code => std::io::Error::from_raw_os_error(code as i32).to_string(),
    }
}

fn module_path(module: HMODULE) -> Option<PathBuf> {
    let mut buffer = vec![0u16; 32 * 1024];
    // SAFETY: the buffer's length is passed; the module handle is valid.
    let length = unsafe { GetModuleFileNameW(module, buffer.as_mut_ptr(), buffer.len() as u32) };
    (length > 0).then(|| PathBuf::from(OsString::from_wide(&buffer[..length as usize])))
}

/// Records where the DLL was loaded from, once its imports are bound.
fn bind(module: HMODULE, path: PathBuf) -> Result<&'static Path, String> {
    delay::bind_imports(module, &path)?;
    let folder = path.parent().map(Path::to_path_buf).unwrap_or_default();
    tracing::info!("Python: {}", path.display());
    Ok(LOADED.get_or_init(|| folder).as_path())
}

fn registry_string(root: HKEY, key: &str) -> Option<PathBuf> {
    let key = wide(OsStr::new(key));
    let mut buffer = vec![0u16; 1024];
    let mut size = (buffer.len() * 2) as u32;
    // SAFETY: the key is NUL-terminated; `size` is the buffer's size in bytes; the default value
    // (null name) is read as a string.
    let status = unsafe {
        RegGetValueW(
            root,
            key.as_ptr(),
            std::ptr::null(),
            RRF_RT_REG_SZ,
            std::ptr::null_mut(),
            buffer.as_mut_ptr().cast(),
            &mut size,
        )
    };
    if status != 0 {
        return None;
    }
    let chars = (size as usize / 2).saturating_sub(1);
    Some(PathBuf::from(OsString::from_wide(&buffer[..chars])))
}

/// The delay-load binding of mingw builds (build.rs).
#[cfg(target_env = "gnu")]
mod delay {
    use std::ffi::c_char;
    use std::path::Path;

    use windows_sys::Win32::Foundation::HMODULE;
    use windows_sys::Win32::System::LibraryLoader::GetProcAddress;

    /// The delay-import descriptor of the DLL (`ImgDelayDescr`; every address an image offset).
    #[repr(C)]
    struct DelayDescriptor {
        attributes: u32,
        dll_name: u32,
        module_handle: u32,
        address_table: u32,
        name_table: u32,
        bound_table: u32,
        unload_table: u32,
        timestamp: u32,
    }

    extern "C" {
        /// The start of this executable's image: the descriptor's offsets are relative to it.
        static __ImageBase: u8;
        /// Written by dlltool into the delay-import library build.rs makes.
        #[link_name = "__DELAY_IMPORT_DESCRIPTOR_python_dll_a"]
        static PYTHON_IMPORTS: DelayDescriptor;
        /// mingw-w64's delay-load helper (libmingwex): resolves one import and patches its slot.
        /// (Its `__HrLoadAllImportsForDll` cannot be used: GNU ld leaves the image's delay-import
        /// directory empty, which that function searches.)
        fn __delayLoadHelper2(descriptor: *const DelayDescriptor, slot: *mut usize) -> usize;
    }

    /// Names in the import table with this bit set are ordinals, not names.
    const ORDINAL_FLAG: usize = 1 << (usize::BITS - 1);

    /// Binds every import of the loaded DLL, so nothing is resolved lazily later. A DLL that
    /// lacks one of them (another CPython version renamed as this one) is refused here, with
    /// the name, rather than crashing the process at the first call.
    pub fn bind_imports(module: HMODULE, path: &Path) -> Result<(), String> {
        // SAFETY: the descriptor and the tables it points to are in this image, laid out by
        // dlltool and the linker; the name table ends with a zero entry; each name entry is a
        // 2-byte hint followed by a NUL-terminated name. The helper patches one table slot.
        unsafe {
            let base = std::ptr::addr_of!(__ImageBase) as usize;
            let descriptor = std::ptr::addr_of!(PYTHON_IMPORTS);
            let names = (base + (*descriptor).name_table as usize) as *const usize;
            let slots = (base + (*descriptor).address_table as usize) as *mut usize;
            let count = (0..).take_while(|&i| *names.add(i) != 0).count();
            let missing: Vec<String> = (0..count)
                .map(|i| *names.add(i))
                .filter(|entry| entry & ORDINAL_FLAG == 0)
                .map(|entry| (base + entry + 2) as *const c_char)
                .filter(|&name| GetProcAddress(module, name.cast()).is_none())
                .map(|name| {
                    std::ffi::CStr::from_ptr(name)
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "{} is not the CPython {} this wfastcgi was built for: it lacks {}",
                    path.display(),
                    env!("WFASTCGI_BUILD_PYTHON_VERSION"),
                    missing.join(", ")
                ));
            }
            for i in 0..count {
                __delayLoadHelper2(descriptor, slots.add(i));
            }
        }
        Ok(())
    }
}

/// Other toolchains (MSVC, building the sdist on Windows) link the DLL as an ordinary import:
/// the loader has bound it before `main`, so the process needs it beside the binary or on PATH.
#[cfg(not(target_env = "gnu"))]
mod delay {
    use std::path::Path;

    use windows_sys::Win32::Foundation::HMODULE;

    pub fn bind_imports(_module: HMODULE, _path: &Path) -> Result<(), String> {
        Ok(())
    }
}
