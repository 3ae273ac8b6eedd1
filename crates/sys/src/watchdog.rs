//! The four watchdog ioctls of `linux/watchdog.h`. Each one passes a pointer
//! to an initialized value of exactly the type (and so the size) its request
//! number encodes.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `struct watchdog_info` of `linux/watchdog.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchdogInfo {
    /// `WDIOF_*` bits: what the driver supports.
    pub options: u32,
    pub firmware_version: u32,
    /// The driver's name, NUL-padded.
    pub identity: [u8; 32],
}

const W: u32 = b'W' as u32;
/// `_IOR('W', 0, struct watchdog_info)`.
pub const WDIOC_GETSUPPORT: libc::Ioctl = libc::_IOR::<WatchdogInfo>(W, 0);
/// `_IOR('W', 5, int)`: the argument is ignored by the kernel.
pub const WDIOC_KEEPALIVE: libc::Ioctl = libc::_IOR::<c_int>(W, 5);
/// `_IOWR('W', 6, int)`: seconds in, the timeout the driver set out.
pub const WDIOC_SETTIMEOUT: libc::Ioctl = libc::_IOWR::<c_int>(W, 6);
/// `_IOR('W', 7, int)`: seconds.
pub const WDIOC_GETTIMEOUT: libc::Ioctl = libc::_IOR::<c_int>(W, 7);

/// What the driver is and supports (`WDIOC_GETSUPPORT`).
pub fn get_support(fd: impl AsFd) -> io::Result<WatchdogInfo> {
    let mut info = WatchdogInfo::default();
    // SAFETY: the descriptor is borrowed, so open; `info` is an initialized,
    // exclusively borrowed `watchdog_info`, the type and size the request
    // number encodes; the kernel writes at most that many bytes into it and
    // keeps no pointer after the call returns. A driver that does not know
    // the request answers ENOTTY and writes nothing ('W' 0-31 are reserved
    // to watchdogs in the kernel's ioctl registry).
    let rc = unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            WDIOC_GETSUPPORT,
            &mut info as *mut WatchdogInfo,
        )
    };
    result(rc)?;
    Ok(info)
}

/// Restarts the device's countdown (`WDIOC_KEEPALIVE`).
pub fn keepalive(fd: impl AsFd) -> io::Result<()> {
    let mut ignored: c_int = 0;
    // SAFETY: the descriptor is borrowed, so open; `ignored` is an
    // initialized, exclusively borrowed int, the type the request number
    // encodes; the kernel does not read or write more than that and keeps
    // no pointer after the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            WDIOC_KEEPALIVE,
            &mut ignored as *mut c_int,
        )
    };
    result(rc)
}

/// Asks for a timeout of `secs` seconds (`WDIOC_SETTIMEOUT`); returns the
/// timeout the driver actually set, which it may round.
pub fn set_timeout(fd: impl AsFd, secs: c_int) -> io::Result<c_int> {
    let mut value = secs;
    // SAFETY: the descriptor is borrowed, so open; `value` is an
    // initialized, exclusively borrowed int, the type the request number
    // encodes; the kernel reads it and writes back the timeout it set,
    // nothing beyond it, and keeps no pointer after the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            WDIOC_SETTIMEOUT,
            &mut value as *mut c_int,
        )
    };
    result(rc)?;
    Ok(value)
}

/// The timeout in force, in seconds (`WDIOC_GETTIMEOUT`).
pub fn get_timeout(fd: impl AsFd) -> io::Result<c_int> {
    let mut value: c_int = 0;
    // SAFETY: as for `set_timeout`: an open descriptor and an initialized
    // int of the encoded type, written by the kernel and not retained.
    let rc = unsafe {
        libc::ioctl(
            fd.as_fd().as_raw_fd(),
            WDIOC_GETTIMEOUT,
            &mut value as *mut c_int,
        )
    };
    result(rc)?;
    Ok(value)
}

/// An ioctl succeeded when it returned a non-negative value.
fn result(rc: c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers `linux/watchdog.h` gives on the architectures with the
    /// generic ioctl layout (direction in bits 30-31, size in bits 16-29).
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "x86"))]
    fn request_numbers_match_the_kernel_header() {
        assert_eq!(std::mem::size_of::<WatchdogInfo>(), 40);
        assert_eq!(WDIOC_GETSUPPORT as u32, 0x8028_5700);
        assert_eq!(WDIOC_KEEPALIVE as u32, 0x8004_5705);
        assert_eq!(WDIOC_SETTIMEOUT as u32, 0xc004_5706);
        assert_eq!(WDIOC_GETTIMEOUT as u32, 0x8004_5707);
    }

    /// A regular file has no ioctls: every request fails with ENOTTY and
    /// nothing is written into the caller's value.
    #[test]
    fn a_regular_file_answers_enotty() {
        let path = std::env::temp_dir().join(format!("mainstay-sys-wd-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let enotty = Some(libc::ENOTTY);
        assert_eq!(get_support(&file).unwrap_err().raw_os_error(), enotty);
        assert_eq!(keepalive(&file).unwrap_err().raw_os_error(), enotty);
        assert_eq!(set_timeout(&file, 2).unwrap_err().raw_os_error(), enotty);
        assert_eq!(get_timeout(&file).unwrap_err().raw_os_error(), enotty);
    }
}
