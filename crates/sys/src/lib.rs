//! The workspace's only `unsafe` code: small, safe wrappers over the system
//! calls that std has no safe form of. Every other crate has
//! `#![forbid(unsafe_code)]` and calls these instead.
//!
//! Each wrapper takes only safe Rust values (borrowed descriptors, slices,
//! C strings, plain integers), returns owned values, keeps the system call's
//! result and errno as they are (`io::Error::last_os_error()` on failure),
//! and has one `// SAFETY:` comment per `unsafe` block saying why it is
//! sound. Nothing here decides anything: the policy stays with the caller.
//!
//! - `process`: signals, ids, parent-death signals installed before `exec`,
//!   scheduling, resource limits, clock ticks;
//! - `user`: the password database (`getpwnam_r`, `getpwuid_r`);
//! - `clock`: the clock's synchronisation as the kernel knows it (`adjtimex`);
//! - `fs`: free space (`statvfs`);
//! - `net`: local addresses (`getifaddrs`), reads and half-closes on a
//!   borrowed socket, a raw link-layer broadcast, network namespaces;
//! - `watchdog`: the ioctls of `linux/watchdog.h`.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod clock;
pub mod fs;
pub mod net;
pub mod process;
pub mod user;
pub mod watchdog;

use std::io;

/// `Ok(())` when a system call returned 0, else the error in errno.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
