//! IIS's end of the pipe: overlapped reads and writes, each bounded by a timeout, so a gateway
//! that stops answering fails the scenario instead of hanging it.

use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::time::Duration;

use windows_sys::Win32::Foundation::{
    GetLastError, ERROR_BROKEN_PIPE, ERROR_IO_PENDING, ERROR_PIPE_NOT_CONNECTED, HANDLE,
    WAIT_OBJECT_0,
};
use windows_sys::Win32::Storage::FileSystem::{ReadFile, WriteFile};
use windows_sys::Win32::System::Threading::{CreateEventW, WaitForSingleObject};
use windows_sys::Win32::System::IO::{CancelIoEx, GetOverlappedResult, OVERLAPPED};

/// The client end IIS opens with `FILE_FLAG_OVERLAPPED`. Reads and writes may run on two
/// threads at once, as IIS sends a body while it reads the answer.
pub struct Pipe {
    handle: OwnedHandle,
    pub timeout: Duration,
}

// SAFETY: every operation has its own OVERLAPPED and event; the handle is only used through them.
unsafe impl Sync for Pipe {}

impl Pipe {
    pub fn new(handle: OwnedHandle) -> Pipe {
        Pipe {
            handle,
            timeout: Duration::from_secs(60),
        }
    }

    fn raw(&self) -> HANDLE {
        self.handle.as_raw_handle() as HANDLE
    }

    /// Reads what is there (at least one byte); 0 when the gateway closed its end.
    pub fn read(&self, buffer: &mut [u8]) -> io::Result<usize> {
        let length = buffer.len().min(u32::MAX as usize) as u32;
        self.overlapped(|handle, overlapped| {
            // SAFETY: the buffer outlives the operation, which `overlapped` waits for.
            unsafe {
                ReadFile(
                    handle,
                    buffer.as_mut_ptr(),
                    length,
                    std::ptr::null_mut(),
                    overlapped,
                )
            }
        })
    }

    pub fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let length = data.len().min(1 << 20) as u32;
            let written = self.overlapped(|handle, overlapped| {
                // SAFETY: as in `read`.
                unsafe {
                    WriteFile(
                        handle,
                        data.as_ptr(),
                        length,
                        std::ptr::null_mut(),
                        overlapped,
                    )
                }
            })?;
            if written == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            data = &data[written..];
        }
        Ok(())
    }

    /// Starts one overlapped operation and waits for it, up to the timeout.
    fn overlapped(&self, start: impl FnOnce(HANDLE, *mut OVERLAPPED) -> i32) -> io::Result<usize> {
        // SAFETY: a fresh manual-reset event, closed when `_event` drops; the OVERLAPPED lives
        // on this frame until the operation has completed or been cancelled and waited for.
        unsafe {
            let event = CreateEventW(std::ptr::null(), 1, 0, std::ptr::null());
            if event.is_null() {
                return Err(io::Error::last_os_error());
            }
            let _event = OwnedHandle::from_raw_handle(event as _);
            let mut overlapped: OVERLAPPED = std::mem::zeroed();
            overlapped.hEvent = event;
            if start(self.raw(), &mut overlapped) == 0 {
                match GetLastError() {
                    ERROR_IO_PENDING => {}
                    ERROR_BROKEN_PIPE | ERROR_PIPE_NOT_CONNECTED => return Ok(0),
                    code => return Err(io::Error::from_raw_os_error(code as i32)),
                }
                let millis = self.timeout.as_millis().min(u32::MAX as u128 - 1) as u32;
                if WaitForSingleObject(event, millis) != WAIT_OBJECT_0 {
                    CancelIoEx(self.raw(), &overlapped);
                    let mut ignored = 0;
                    GetOverlappedResult(self.raw(), &overlapped, &mut ignored, 1);
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the gateway did not answer within {:?}", self.timeout),
                    ));
                }
            }
            let mut done = 0;
            if GetOverlappedResult(self.raw(), &overlapped, &mut done, 1) == 0 {
                return match GetLastError() {
                    ERROR_BROKEN_PIPE | ERROR_PIPE_NOT_CONNECTED => Ok(0),
                    code => Err(io::Error::from_raw_os_error(code as i32)),
                };
            }
            Ok(done as usize)
        }
    }
}
