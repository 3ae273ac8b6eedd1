//! The password and group databases: an account's ids and home directory,
//! a group's id.

use std::ffi::{CStr, c_char};
use std::io;
use std::path::PathBuf;

/// An entry of the password database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The buffer the reentrant lookups write the entry's strings into. An
/// entry that does not fit is an error (`ERANGE`), not a retry.
const BUFFER: usize = 16 * 1024;

/// `getpwnam_r`: the account named `name`; `Ok(None)` when there is none,
/// `Err` with the code the lookup returned when it fails.
pub fn by_name(name: &CStr) -> io::Result<Option<User>> {
    lookup(|pwd, buf, found| {
        // SAFETY: `name` is NUL-terminated; `pwd`, `buf` (valid for
        // `buf.len()` bytes) and `found` are exclusively borrowed for the
        // call, and getpwnam_r writes nothing beyond them.
        unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), found) }
    })
}

/// `getpwuid_r`: the account with user id `uid`; as [`by_name`].
pub fn by_uid(uid: u32) -> io::Result<Option<User>> {
    lookup(|pwd, buf, found| {
        // SAFETY: as in `by_name`, without the name.
        unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), found) }
    })
}

/// `getgrnam_r`: the id of the group named `name`; `Ok(None)` when there
/// is none.
pub fn group_id(name: &CStr) -> io::Result<Option<u32>> {
    let mut buf = vec![0 as c_char; BUFFER];
    // SAFETY: `group` is a C struct of integers and pointers, for which
    // all-zero bytes (null pointers) are a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: `name` is NUL-terminated; `group`, `buf` (valid for
    // `buf.len()` bytes) and `found` are exclusively borrowed for the call,
    // and getgrnam_r writes nothing beyond them. Only the id is read back,
    // so no pointer into `buf` outlives it.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok((!found.is_null()).then_some(group.gr_gid))
}

/// getpwnam is not thread-safe; the _r variants write into our buffer.
fn lookup(
    call: impl FnOnce(&mut libc::passwd, &mut [c_char], &mut *mut libc::passwd) -> libc::c_int,
) -> io::Result<Option<User>> {
    let mut buf = vec![0 as c_char; BUFFER];
    // SAFETY: `passwd` is a C struct of integers and pointers, for which
    // all-zero bytes (null pointers) are a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let rc = call(&mut pwd, &mut buf, &mut found);
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Ok(None);
    }
    let text = |p: *const c_char| {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: a non-null string field of an entry the lookup filled in:
        // NUL-terminated, inside `buf`, which is alive and not written to
        // while this borrow lasts.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    Ok(Some(User {
        name: text(pwd.pw_name),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home: PathBuf::from(text(pwd.pw_dir)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_by_name_and_by_uid() {
        let root = by_name(c"root").unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.name, "root");
        assert_eq!(by_uid(0).unwrap(), Some(root));
    }

    #[test]
    fn groups_by_name() {
        assert_eq!(group_id(c"root").unwrap(), Some(0));
        assert_eq!(group_id(c"no-such-group-mainstay").unwrap(), None);
    }

    #[test]
    fn an_unknown_account_is_none() {
        assert_eq!(by_name(c"no-such-user-mainstay").unwrap(), None);
        assert_eq!(by_uid(u32::MAX - 7).unwrap(), None);
    }
}
