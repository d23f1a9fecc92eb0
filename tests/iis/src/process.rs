//! Starting the FastCGI process the way IIS's FastCGI module (iisfcgi.dll) does: a duplex,
//! overlapped named pipe whose server end is the child's standard input, IIS's own end opened
//! before the child starts, invalid standard output and error, `_FCGI_X_PIPE_` and
//! `_FCGI_SHUTDOWN_EVENT_` in the environment, only those two handles inherited.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use windows_sys::Win32::Foundation::{
    SetHandleInformation, GENERIC_READ, GENERIC_WRITE, HANDLE, HANDLE_FLAG_INHERIT,
    INVALID_HANDLE_VALUE, WAIT_OBJECT_0,
};
use windows_sys::Win32::Security::SECURITY_ATTRIBUTES;
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, FILE_FLAG_OVERLAPPED, OPEN_EXISTING, PIPE_ACCESS_DUPLEX,
};
use windows_sys::Win32::System::Pipes::{
    CreateNamedPipeW, PIPE_READMODE_BYTE, PIPE_TYPE_BYTE, PIPE_WAIT,
};
use windows_sys::Win32::System::Threading::{
    CreateEventW, CreateProcessW, DeleteProcThreadAttributeList, GetExitCodeProcess,
    InitializeProcThreadAttributeList, ResumeThread, SetEvent, TerminateProcess,
    UpdateProcThreadAttribute, WaitForSingleObject, CREATE_SUSPENDED, CREATE_UNICODE_ENVIRONMENT,
    DETACHED_PROCESS, EXTENDED_STARTUPINFO_PRESENT, LPPROC_THREAD_ATTRIBUTE_LIST,
    PROCESS_INFORMATION, PROC_THREAD_ATTRIBUTE_HANDLE_LIST, STARTF_USESTDHANDLES, STARTUPINFOEXW,
};

use crate::pipe::Pipe;

/// A FastCGI process started as IIS starts it.
pub struct IisProcess {
    process: OwnedHandle,
    shutdown_event: Option<OwnedHandle>,
    pub pipe: Option<Pipe>,
    pub pipe_name: String,
}

fn wide(text: &OsStr) -> Vec<u16> {
    text.encode_wide().chain(Some(0)).collect()
}

fn check(ok: i32, what: &str) -> io::Result<()> {
    if ok == 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn owned(handle: HANDLE, what: &str) -> io::Result<OwnedHandle> {
    if handle.is_null() || handle == INVALID_HANDLE_VALUE {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    // SAFETY: a handle just created by this process, owned by nobody else.
    Ok(unsafe { OwnedHandle::from_raw_handle(handle as _) })
}

/// `IISFCGI-<unique>`, as IIS names its pipes.
fn pipe_name() -> String {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        r"\\.\pipe\IISFCGI-{:08x}-{:04x}-{:08x}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed),
        nanos as u32
    )
}

/// The environment block: this process's variables, plus `extra`, sorted as Windows wants it.
fn environment_block(extra: &[(String, String)]) -> Vec<u16> {
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            !extra
                .iter()
                .any(|(e, _)| OsStr::new(e).eq_ignore_ascii_case(k))
        })
        .collect();
    vars.extend(extra.iter().map(|(k, v)| (k.into(), v.into())));
    vars.sort_by_key(|(k, _)| k.to_string_lossy().to_uppercase());
    let mut block = Vec::new();
    for (key, value) in vars {
        block.extend(key.encode_wide());
        block.push(u16::from(b'='));
        block.extend(value.encode_wide());
        block.push(0);
    }
    block.push(0);
    block
}

impl IisProcess {
    /// Starts `exe` with `args` in `dir`, IIS-style. `signal_before_terminate` creates the
    /// shutdown event (`signalBeforeTerminateSeconds` above 0).
    pub fn start(
        exe: &Path,
        args: &str,
        dir: &Path,
        env: &[(String, String)],
        signal_before_terminate: bool,
    ) -> io::Result<IisProcess> {
        let name = pipe_name();
        let inheritable = SECURITY_ATTRIBUTES {
            nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: std::ptr::null_mut(),
            bInheritHandle: 1,
        };
        // SAFETY: plain Win32 calls with NUL-terminated strings and valid pointers; every
        // handle returned is wrapped in an OwnedHandle at once.
        unsafe {
            let server = owned(
                CreateNamedPipeW(
                    wide(OsStr::new(&name)).as_ptr(),
                    PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED,
                    PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT,
                    1,
                    4096,
                    4096,
                    0,
                    &inheritable,
                ),
                "CreateNamedPipeW",
            )?;
            // IIS opens its end before the process starts: the child never calls ConnectNamedPipe.
            let client = owned(
                CreateFileW(
                    wide(OsStr::new(&name)).as_ptr(),
                    GENERIC_READ | GENERIC_WRITE,
                    0,
                    std::ptr::null(),
                    OPEN_EXISTING,
                    FILE_FLAG_OVERLAPPED,
                    std::ptr::null_mut(),
                ),
                "CreateFileW (IIS's end of the pipe)",
            )?;
            let shutdown_event = if signal_before_terminate {
                Some(owned(
                    CreateEventW(&inheritable, 1, 0, std::ptr::null()),
                    "CreateEventW",
                )?)
            } else {
                None
            };

            let mut all_env = env.to_vec();
            all_env.push(("_FCGI_X_PIPE_".to_owned(), name.clone()));
            let mut inherited = vec![server.as_raw_handle() as HANDLE];
            if let Some(event) = &shutdown_event {
                all_env.push((
                    "_FCGI_SHUTDOWN_EVENT_".to_owned(),
                    (event.as_raw_handle() as usize).to_string(),
                ));
                inherited.push(event.as_raw_handle() as HANDLE);
            }
            let mut block = environment_block(&all_env);

            // Only the pipe and the event are inherited (PROC_THREAD_ATTRIBUTE_HANDLE_LIST).
            let mut size = 0;
            InitializeProcThreadAttributeList(std::ptr::null_mut(), 1, 0, &mut size);
            let mut attributes = vec![0u8; size];
            let list = attributes.as_mut_ptr() as LPPROC_THREAD_ATTRIBUTE_LIST;
            check(
                InitializeProcThreadAttributeList(list, 1, 0, &mut size),
                "InitializeProcThreadAttributeList",
            )?;
            let updated = UpdateProcThreadAttribute(
                list,
                0,
                PROC_THREAD_ATTRIBUTE_HANDLE_LIST as usize,
                inherited.as_ptr().cast(),
                std::mem::size_of_val(inherited.as_slice()),
                std::ptr::null_mut(),
                std::ptr::null(),
            );
            let mut startup: STARTUPINFOEXW = std::mem::zeroed();
            startup.StartupInfo.cb = std::mem::size_of::<STARTUPINFOEXW>() as u32;
            startup.StartupInfo.dwFlags = STARTF_USESTDHANDLES;
            startup.StartupInfo.hStdInput = server.as_raw_handle() as HANDLE;
            startup.StartupInfo.hStdOutput = INVALID_HANDLE_VALUE;
            startup.StartupInfo.hStdError = INVALID_HANDLE_VALUE;
            startup.lpAttributeList = list;
            let mut command_line = wide(OsStr::new(&format!("\"{}\" {args}", exe.display())));
            let mut info: PROCESS_INFORMATION = std::mem::zeroed();
            let created = if updated == 0 {
                0
            } else {
                CreateProcessW(
                    wide(exe.as_os_str()).as_ptr(),
                    command_line.as_mut_ptr(),
                    std::ptr::null(),
                    std::ptr::null(),
                    1,
                    CREATE_SUSPENDED
                        | DETACHED_PROCESS
                        | CREATE_UNICODE_ENVIRONMENT
                        | EXTENDED_STARTUPINFO_PRESENT,
                    block.as_mut_ptr().cast(),
                    wide(dir.as_os_str()).as_ptr(),
                    &startup.StartupInfo,
                    &mut info,
                )
            };
            DeleteProcThreadAttributeList(list);
            check(updated, "UpdateProcThreadAttribute")?;
            check(created, &format!("CreateProcessW {}", exe.display()))?;
            let process = owned(info.hProcess, "process handle")?;
            let thread = owned(info.hThread, "thread handle")?;
            // IIS clears the inherit flag on its copy before the process runs; its copy of the
            // server end is then closed, so the child's exit breaks the pipe.
            SetHandleInformation(server.as_raw_handle() as HANDLE, HANDLE_FLAG_INHERIT, 0);
            ResumeThread(thread.as_raw_handle() as HANDLE);
            drop(server);
            Ok(IisProcess {
                process,
                shutdown_event,
                pipe: Some(Pipe::new(client)),
                pipe_name: name,
            })
        }
    }

    /// The pipe, while IIS keeps it open.
    pub fn pipe(&self) -> &Pipe {
        self.pipe.as_ref().expect("the pipe is still open")
    }

    /// IIS closing its end (recycling, or the worker process ending).
    pub fn close_pipe(&mut self) {
        self.pipe = None;
    }

    /// Signals `_FCGI_SHUTDOWN_EVENT_`, as IIS does before it terminates the process.
    pub fn signal_shutdown(&self) {
        let event = self
            .shutdown_event
            .as_ref()
            .expect("started with signal_before_terminate");
        // SAFETY: the event handle is open.
        unsafe { SetEvent(event.as_raw_handle() as HANDLE) };
    }

    /// The exit code, once the process has ended within `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<u32> {
        let handle = self.process.as_raw_handle() as HANDLE;
        // SAFETY: the process handle is open.
        unsafe {
            if WaitForSingleObject(handle, timeout.as_millis() as u32) != WAIT_OBJECT_0 {
                return None;
            }
            let mut code = 0;
            (GetExitCodeProcess(handle, &mut code) != 0).then_some(code)
        }
    }

    pub fn is_running(&self) -> bool {
        self.wait(Duration::ZERO).is_none()
    }
}

impl Drop for IisProcess {
    /// What IIS does after `signalBeforeTerminateSeconds`.
    fn drop(&mut self) {
        if self.is_running() {
            // SAFETY: the process handle is open.
            unsafe { TerminateProcess(self.process.as_raw_handle() as HANDLE, 1) };
        }
    }
}
