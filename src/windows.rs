//! The Windows-only pieces, kept this small: what IIS hands over as standard input, its
//! shutdown event, and the named event that asks for a stack dump (Windows' SIGUSR1). Everything they feed (the connection, the accept loop, shutdown) is the
//! shared code tested on Linux; see ARCHITECTURE.md.

use std::io;
use std::os::windows::io::{FromRawHandle, FromRawSocket, OwnedHandle, RawHandle, RawSocket};

use socket2::Socket;
use windows_sys::Wdk::Storage::FileSystem::{
    FileModeInformation, NtQueryInformationFile, FILE_MODE_INFORMATION, FILE_SYNCHRONOUS_IO_ALERT,
    FILE_SYNCHRONOUS_IO_NONALERT,
};
use windows_sys::Win32::Foundation::{HANDLE, INVALID_HANDLE_VALUE};
use windows_sys::Win32::Networking::WinSock::{
    getsockopt, WSAStartup, SOCKET, SOL_SOCKET, SO_ACCEPTCONN, WSADATA,
};
use windows_sys::Win32::Storage::FileSystem::{GetFileType, FILE_TYPE_CHAR, FILE_TYPE_PIPE};
use windows_sys::Win32::System::Console::{GetStdHandle, STD_INPUT_HANDLE};
use windows_sys::Win32::System::EventLog::{
    DeregisterEventSource, RegisterEventSourceW, ReportEventW, EVENTLOG_ERROR_TYPE,
};
use windows_sys::Win32::System::Threading::{WaitForSingleObject, INFINITE};
use windows_sys::Win32::System::IO::IO_STATUS_BLOCK;

/// What standard input is.
pub enum Stdin {
    /// IIS's default NamedPipe protocol: the server end of a duplex, overlapped named pipe.
    NamedPipe(OwnedHandle),
    /// A pipe opened for synchronous I/O (`type file | wfastcgi.exe`, a service wrapper's
    /// anonymous pipe): not what IIS hands over, and it cannot be served asynchronously.
    SynchronousPipe,
    /// IIS's `protocol="Tcp"`: a listening socket on 127.0.0.1.
    Listener(Socket),
    Terminal,
    Other,
}

pub fn stdin() -> io::Result<Stdin> {
    // SAFETY: GetStdHandle returns the process's standard input handle or an invalid value.
    let handle: HANDLE = unsafe { GetStdHandle(STD_INPUT_HANDLE) };
    if handle.is_null() || handle == INVALID_HANDLE_VALUE {
        return Ok(Stdin::Other);
    }
    // SAFETY: GetFileType only inspects the handle.
    match unsafe { GetFileType(handle) } {
        FILE_TYPE_CHAR => Ok(Stdin::Terminal),
        // A SOCKET also reports FILE_TYPE_PIPE; only a listening socket answers SO_ACCEPTCONN.
        FILE_TYPE_PIPE if is_listening_socket(handle as SOCKET) => {
            // SAFETY: the handle is a socket this process owns from now on.
            Ok(Stdin::Listener(unsafe {
                Socket::from_raw_socket(handle as RawSocket)
            }))
        }
        FILE_TYPE_PIPE if !is_overlapped(handle) => Ok(Stdin::SynchronousPipe),
        // SAFETY: the handle is the pipe IIS gave this process; it becomes its only owner.
        FILE_TYPE_PIPE => Ok(Stdin::NamedPipe(unsafe {
            OwnedHandle::from_raw_handle(handle as RawHandle)
        })),
        _ => Ok(Stdin::Other),
    }
}

/// Whether the handle was opened for overlapped I/O (IIS opens its pipe so): one opened for
/// synchronous I/O carries FILE_SYNCHRONOUS_IO_(NON)ALERT in its mode.
fn is_overlapped(handle: HANDLE) -> bool {
    let mut status = IO_STATUS_BLOCK::default();
    let mut mode = FILE_MODE_INFORMATION { Mode: 0 };
    // SAFETY: the buffer is a FILE_MODE_INFORMATION of the size passed.
    let result = unsafe {
        NtQueryInformationFile(
            handle,
            &mut status,
            (&mut mode as *mut FILE_MODE_INFORMATION).cast(),
            std::mem::size_of::<FILE_MODE_INFORMATION>() as u32,
            FileModeInformation,
        )
    };
    result >= 0 && mode.Mode & (FILE_SYNCHRONOUS_IO_ALERT | FILE_SYNCHRONOUS_IO_NONALERT) == 0
}

/// Writes an error to the Windows Application event log (source `wfastcgi`): before a request
/// names the site's WSGI_LOG, and under IIS with no standard error, it is the only place an
/// administrator can read why the process stopped.
pub fn report_error(message: &str) {
    let source: Vec<u16> = "wfastcgi\0".encode_utf16().collect();
    let text: Vec<u16> = message.encode_utf16().chain(Some(0)).collect();
    let strings = [text.as_ptr()];
    // SAFETY: NUL-terminated strings that outlive the calls; the handle is closed after use.
    unsafe {
        let log = RegisterEventSourceW(std::ptr::null(), source.as_ptr());
        if log.is_null() {
            return;
        }
        ReportEventW(
            log,
            EVENTLOG_ERROR_TYPE,
            0,
            1,
            std::ptr::null_mut(),
            1,
            0,
            strings.as_ptr(),
            std::ptr::null(),
        );
        DeregisterEventSource(log);
    }
}

fn is_listening_socket(socket: SOCKET) -> bool {
    let mut accepting: i32 = 0;
    let mut length = std::mem::size_of::<i32>() as i32;
    // SAFETY: Winsock is started before use (idempotent); getsockopt writes at most `length`
    // bytes into `accepting` and fails harmlessly on a handle that is not a socket.
    unsafe {
        let mut data: WSADATA = std::mem::zeroed();
        WSAStartup(0x0202, &mut data);
        getsockopt(
            socket,
            SOL_SOCKET,
            SO_ACCEPTCONN,
            (&mut accepting as *mut i32).cast(),
            &mut length,
        ) == 0
            && accepting != 0
    }
}

/// Takes the pipe over for tokio. The handle must be overlapped, as IIS creates it.
pub fn adopt_pipe(
    handle: OwnedHandle,
) -> io::Result<tokio::net::windows::named_pipe::NamedPipeServer> {
    use std::os::windows::io::IntoRawHandle;
    // SAFETY: the handle is an owned, overlapped named pipe; ownership moves to tokio.
    unsafe {
        tokio::net::windows::named_pipe::NamedPipeServer::from_raw_handle(handle.into_raw_handle())
    }
}

/// Resolves when IIS signals `_FCGI_SHUTDOWN_EVENT_` (set when `signalBeforeTerminateSeconds`
/// is above 0); never, without one.
pub async fn shutdown_event() {
    let Some(handle) = std::env::var("_FCGI_SHUTDOWN_EVENT_")
        .ok()
        .and_then(|value| value.trim().parse::<usize>().ok())
    else {
        return std::future::pending().await;
    };
    // The event handle is inherited; waiting on it blocks, so a blocking thread does it.
    let waited = tokio::task::spawn_blocking(move || {
        // SAFETY: the handle value names the inheritable event IIS created for this process.
        unsafe { WaitForSingleObject(handle as HANDLE, INFINITE) }
    })
    .await;
    if waited.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The name of the event that asks this process for every thread's Python stack, in the
/// namespace `prefix` (`Global` or `Local`).
fn stack_event_name(prefix: &str) -> String {
    format!("{prefix}\\wfastcgi-stacks-{}", std::process::id())
}

/// Creates the stack-dump event (auto-reset: one dump each time it is set) and returns it with
/// its name: `Global\wfastcgi-stacks-<pid>`, so an administrator's session can open it (under
/// IIS the process runs in session 0, whose `Local` namespace is the global one anyway), else
/// `Local\...` if that name cannot be had (another object holds it). SYSTEM, Administrators and
/// the process's own account may set it.
pub fn stack_event() -> io::Result<(OwnedHandle, String)> {
    use windows_sys::Win32::Foundation::{GetLastError, LocalFree, ERROR_ALREADY_EXISTS};
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::SECURITY_ATTRIBUTES;
    use windows_sys::Win32::System::Threading::CreateEventW;
    let wide = |text: &str| text.encode_utf16().chain([0]).collect::<Vec<u16>>();
    // GA: all access. SY SYSTEM, BA Administrators, OW the owner (this process's account).
    let sddl = wide("D:(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;OW)");
    let mut descriptor = std::ptr::null_mut();
    // SAFETY: a NUL-terminated SDDL string and a pointer to receive the descriptor, which is
    // freed with LocalFree below.
    let converted = unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl.as_ptr(),
            SDDL_REVISION_1,
            &mut descriptor,
            std::ptr::null_mut(),
        )
    } != 0;
    let attributes = SECURITY_ATTRIBUTES {
        nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
        // Without it (never in practice), the default: the process's account and SYSTEM.
        lpSecurityDescriptor: if converted {
            descriptor
        } else {
            std::ptr::null_mut()
        },
        bInheritHandle: 0,
    };
    let mut error = io::Error::other("no namespace tried");
    for prefix in ["Global", "Local"] {
        let name = stack_event_name(prefix);
        let wide_name = wide(&name);
        // SAFETY: valid attributes and a NUL-terminated name; a non-null result is a new handle
        // this process owns.
        let handle = unsafe { CreateEventW(&attributes, 0, 0, wide_name.as_ptr()) };
        if handle.is_null() {
            error = io::Error::last_os_error();
            continue;
        }
        // SAFETY: as above, a new handle.
        let handle = unsafe { OwnedHandle::from_raw_handle(handle as RawHandle) };
        // SAFETY: GetLastError right after CreateEventW succeeded.
        if unsafe { GetLastError() } == ERROR_ALREADY_EXISTS {
            error = io::Error::other(format!("{name} already exists"));
            continue;
        }
        if converted {
            // SAFETY: the descriptor ConvertStringSecurityDescriptor allocated.
            unsafe { LocalFree(descriptor) };
        }
        return Ok((handle, name));
    }
    if converted {
        // SAFETY: as above.
        unsafe { LocalFree(descriptor) };
    }
    Err(error)
}

/// Blocks until `event` is set.
pub fn wait_for(event: &OwnedHandle) -> io::Result<()> {
    use std::os::windows::io::AsRawHandle;
    use windows_sys::Win32::Foundation::WAIT_OBJECT_0;
    // SAFETY: a live event handle this process owns.
    match unsafe { WaitForSingleObject(event.as_raw_handle() as HANDLE, INFINITE) } {
        WAIT_OBJECT_0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}
