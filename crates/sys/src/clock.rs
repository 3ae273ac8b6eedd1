//! The kernel's view of the system clock's synchronisation (`adjtimex`
//! read-only): whatever runs NTP (chrony, systemd-timesyncd, ntpd), it
//! tells the kernel, so this needs no knowledge of which one runs.

use std::io;

/// What `adjtimex(2)` says of the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockState {
    /// An NTP daemon keeps the clock synchronised (not `TIME_ERROR`, and
    /// `STA_UNSYNC` clear).
    pub synchronized: bool,
    /// The kernel's maximum error estimate, in microseconds.
    pub max_error_us: i64,
}

/// Reads the clock's state without changing anything (`modes` = 0).
pub fn state() -> io::Result<ClockState> {
    // SAFETY: `timex` is a C struct of integers, for which all-zero bytes
    // are a valid value; zero `modes` makes the call read-only.
    let mut timex: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `timex` is exclusively borrowed for the call, and the kernel
    // writes exactly one timex and keeps no pointer.
    let rc = unsafe { libc::adjtimex(&mut timex) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ClockState {
        synchronized: rc != libc::TIME_ERROR && timex.status & libc::STA_UNSYNC == 0,
        max_error_us: timex.maxerror as i64,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_state_can_be_read() {
        let state = super::state().unwrap();
        assert!(state.max_error_us >= 0, "{state:?}");
    }
}
