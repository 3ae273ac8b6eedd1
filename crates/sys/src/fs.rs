//! File systems.

use crate::check;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The bytes unprivileged users may still write on the file system holding
/// `path`; see [`space`].
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    space(path).map(|s| s.available)
}

/// A file system's size and what is left of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// Bytes unprivileged users may still write (`f_bavail * f_frsize`).
    pub available: u64,
    /// The file system's size (`f_blocks * f_frsize`).
    pub total: u64,
}

/// `statvfs` of the file system holding `path`. A path with a NUL byte is
/// `InvalidInput`.
pub fn space(path: &Path) -> io::Result<Space> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statvfs` is a C struct of integers, for which all-zero bytes
    // are a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` an
    // exclusively borrowed statvfs, both alive for the duration of the call;
    // the kernel writes exactly one statvfs and keeps no pointer.
    check(unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) })?;
    Ok(Space {
        available: stat.f_bavail as u64 * stat.f_frsize as u64,
        total: stat.f_blocks as u64 * stat.f_frsize as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_of_a_directory_and_errors() {
        let tmp = space(&std::env::temp_dir()).unwrap();
        assert!(tmp.total >= tmp.available && tmp.total > 0, "{tmp:?}");
        let missing = available_bytes(Path::new("/no/such/dir/mainstay")).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
        let nul = available_bytes(Path::new("a\0b")).unwrap_err();
        assert_eq!(nul.kind(), io::ErrorKind::InvalidInput);
    }
}
