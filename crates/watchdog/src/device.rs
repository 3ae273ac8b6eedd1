//! The real device: `/dev/watchdog` (or `/dev/watchdogN`) opened, its
//! timeout set and checked, fed, and closed cleanly.

use crate::feeder::{self, Device, Feeder};
use mainstay_sys::watchdog as sys;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `WDIOF_SETTIMEOUT`: the timeout can be set.
pub const WDIOF_SETTIMEOUT: u32 = 0x0080;
/// `WDIOF_MAGICCLOSE`: a close after writing `V` disarms the watchdog.
pub const WDIOF_MAGICCLOSE: u32 = 0x0100;
/// `WDIOF_KEEPALIVEPING`: the driver has `WDIOC_KEEPALIVE`.
pub const WDIOF_KEEPALIVEPING: u32 = 0x8000;

/// The misc device `/dev/watchdog` (major 10, minor 130): the first
/// registered watchdog, `watchdog0` in sysfs.
const MISC_MAJOR: u32 = 10;
const WATCHDOG_MINOR: u32 = 130;

/// What to open, and with which timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The device, e.g. `/dev/watchdog`.
    pub device: PathBuf,
    /// The timeout to set; rounded down to whole seconds (drivers take no
    /// fractions), at least 1 s ([`crate::timeout_for`] derives it).
    pub timeout: Duration,
    /// Added to the device's timeout in the feeding rule: the watchdog must
    /// fire at least this long before the fencing deadline.
    pub safety_margin: Duration,
}

/// A refusal: what failed, on which device, why, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error(
        "{device} does not exist: no watchdog driver is loaded; load the board's driver \
         (e.g. iTCO_wdt, sp5100_tco) or softdog (modprobe softdog), or set watchdog.mode = \"off\""
    )]
    Missing { device: PathBuf },
    #[error(
        "cannot open {device}: {source}; the agent must run as root or have write access to \
         {device} (e.g. a udev rule giving its group write access)"
    )]
    Permission { device: PathBuf, source: io::Error },
    #[error(
        "cannot open {device}: it is already open (only one process may hold a watchdog); \
         stop the other user (a running mainstay agent, a watchdog daemon, systemd's \
         RuntimeWatchdogSec=) or set watchdog.device to another device"
    )]
    Busy { device: PathBuf },
    #[error(
        "{device} is not a watchdog device ({why}); set watchdog.device to the watchdog's \
         character device, e.g. /dev/watchdog or /dev/watchdog0"
    )]
    NotAWatchdog { device: PathBuf, why: String },
    #[error("cannot open {device}: {source}; check the device and its driver (dmesg)")]
    Open { device: PathBuf, source: io::Error },
    #[error(
        "{device}'s driver has nowayout set: once opened it can never be disarmed, so this \
         node would be reset every time it stops leading, a switchover included; reload the \
         driver with nowayout=0 (e.g. modprobe softdog nowayout=0) or set watchdog.mode = \"off\""
    )]
    NoWayOut { device: PathBuf },
    #[error(
        "{device}: the device's timeout cannot be set to {secs} s: {why}; choose timing for which \
         the driver accepts the timeout (see docs/configuration.md, [watchdog]) or set \
         watchdog.mode = \"off\""
    )]
    SetTimeout {
        device: PathBuf,
        secs: u64,
        why: String,
    },
    #[error(
        "{device}: asked for a {asked} s timeout, the driver set {got} s, which could outlive \
         the leader's lease; choose timing for which the driver accepts the timeout \
         (see docs/configuration.md, [watchdog]) or set watchdog.mode = \"off\""
    )]
    TimeoutTooLong {
        device: PathBuf,
        asked: u64,
        got: u64,
    },
    #[error(
        "{device}: cannot feed the watchdog: {source}; the host will be reset when it runs out"
    )]
    Feed { device: PathBuf, source: io::Error },
    #[error(
        "{device}: cannot write the magic character to disarm the watchdog: {source}; the host \
         will be reset when it runs out"
    )]
    Close { device: PathBuf, source: io::Error },
}

/// What the driver says it is (`WDIOC_GETSUPPORT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The driver's name, e.g. "Software Watchdog" or "iTCO_wdt".
    pub name: String,
    pub firmware_version: u32,
    /// `WDIOF_*` bits.
    pub options: u32,
}

impl Identity {
    fn from_info(info: &sys::WatchdogInfo) -> Identity {
        let end = info
            .identity
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(info.identity.len());
        Identity {
            name: String::from_utf8_lossy(&info.identity[..end])
                .trim()
                .to_string(),
            firmware_version: info.firmware_version,
            options: info.options,
        }
    }

    /// Whether writing `V` before closing disarms it. Without it the
    /// kernel disarms on any close, a crashed agent's included.
    pub fn magic_close(&self) -> bool {
        self.options & WDIOF_MAGICCLOSE != 0
    }

    /// Whether its timeout can be set.
    pub fn settable_timeout(&self) -> bool {
        self.options & WDIOF_SETTIMEOUT != 0
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.name)?;
        if self.firmware_version != 0 {
            write!(f, " firmware {}", self.firmware_version)?;
        }
        if !self.magic_close() {
            write!(f, " (no magic close: any close disarms it)")?;
        }
        Ok(())
    }
}

/// An open, armed watchdog device.
///
/// **Armed from the moment it is open**: opening starts the countdown
/// (setting the timeout restarts it), so the machine resets `timeout()` after
/// [`Watchdog::open`] unless fed. Opening therefore counts as a feed: open
/// only when [`crate::may_feed`] holds for the current fencing deadline.
///
/// **Disarmed only by [`Watchdog::close_cleanly`]** (the magic close).
/// Dropping a `Watchdog` does *not* disarm it, on purpose: a crashed or
/// confused agent must lead to a reset. The descriptor is then kept open
/// (leaked) until the process exits, so that the kernel neither disarms a
/// driver without magic-close support nor gives it the extra keepalive Linux
/// sends when an armed device is closed without the magic character; the
/// machine resets one timeout after the last feed, and the device cannot be
/// opened again in this process. When the process exits (killed, crashed),
/// the kernel closes the device: it then feeds it once more and keeps it
/// armed (the reset comes one timeout after the exit; the fencing guard
/// stops PostgreSQL at the agent's death anyway), except for a driver
/// without magic-close support ([`Identity::magic_close`]), which any close
/// disarms.
///
/// **nowayout**: a driver loaded with `nowayout` (a module parameter, or
/// `CONFIG_WATCHDOG_NOWAYOUT`) ignores the magic close and can never be
/// disarmed. [`Watchdog::open`] refuses such a device when sysfs says so
/// (`/sys/class/watchdog/watchdogN/nowayout`, Linux 4.5 and later) before
/// opening it; where sysfs cannot tell, a magic close will not disarm it and
/// the machine resets one timeout after it.
#[derive(Debug)]
pub struct Watchdog {
    /// `None` only once closed.
    file: Option<File>,
    device: PathBuf,
    timeout: Duration,
    safety_margin: Duration,
    identity: Identity,
}

impl Watchdog {
    /// Opens `settings.device` (write-only, close-on-exec, so that neither
    /// the guard nor PostgreSQL inherits it), sets its timeout, reads back
    /// the timeout in force and refuses it if it is longer than asked (a
    /// driver may round; a shorter one is kept: it is safe, the feeds just
    /// have to come more often). A device refused after it was opened is
    /// closed cleanly (magic close) before the error is returned, so that
    /// nothing stays armed. The driver's identity (`WDIOC_GETSUPPORT`) is
    /// read first: a device without it is not a watchdog.
    pub fn open(settings: &Settings) -> Result<Watchdog, WatchdogError> {
        let device = settings.device.clone();
        let secs = settings.timeout.as_secs();
        let Some(asked) = std::ffi::c_int::try_from(secs).ok().filter(|&s| s >= 1) else {
            return Err(WatchdogError::SetTimeout {
                device,
                secs,
                why: "a watchdog timeout is between 1 s and 2^31 - 1 s".into(),
            });
        };
        let meta = fs::metadata(&device).map_err(|err| open_error(&device, err))?;
        if !meta.file_type().is_char_device() {
            return Err(WatchdogError::NotAWatchdog {
                why: format!("it is {}, not a character device", kind(&meta)),
                device,
            });
        }
        if nowayout(meta.rdev()) == Some(true) {
            return Err(WatchdogError::NoWayOut { device });
        }
        // Write-only, without create or truncate; std sets O_CLOEXEC.
        let file = OpenOptions::new()
            .write(true)
            .open(&device)
            .map_err(|err| open_error(&device, err))?;
        // From here on the device is armed (a watchdog driver starts
        // counting down on open, with its default timeout until it is set).
        let identity = match sys::get_support(&file) {
            Ok(info) => Identity::from_info(&info),
            Err(err) if err.raw_os_error() == Some(libc::ENOTTY) => {
                // No watchdog ioctls at all: not a watchdog, nothing armed;
                // a plain close, no stray 'V' written to whatever it is.
                drop(file);
                return Err(WatchdogError::NotAWatchdog {
                    device,
                    why: "its driver does not know the watchdog ioctls: ENOTTY".into(),
                });
            }
            Err(err) => {
                disarm(file);
                return Err(WatchdogError::NotAWatchdog {
                    device,
                    why: format!("WDIOC_GETSUPPORT failed: {err}"),
                });
            }
        };
        let refuse = |file: File, err: WatchdogError| {
            disarm(file);
            Err(err)
        };
        if let Err(err) = sys::set_timeout(&file, asked) {
            let why = match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) if !identity.settable_timeout() => {
                    format!("its driver ({}) has a fixed timeout", identity.name)
                }
                Some(libc::EINVAL) => format!(
                    "{err}: outside the range its driver ({}) accepts",
                    identity.name
                ),
                _ => err.to_string(),
            };
            return refuse(file, WatchdogError::SetTimeout { device, secs, why });
        }
        let got = match sys::get_timeout(&file) {
            Ok(got) => got,
            Err(err) => {
                let why = format!("WDIOC_GETTIMEOUT failed: {err}");
                return refuse(file, WatchdogError::SetTimeout { device, secs, why });
            }
        };
        let got = u64::try_from(got).unwrap_or(0);
        if got > secs {
            return refuse(
                file,
                WatchdogError::TimeoutTooLong {
                    device,
                    asked: secs,
                    got,
                },
            );
        }
        if got == 0 {
            let why = "the driver reports a timeout of 0 s".to_string();
            return refuse(file, WatchdogError::SetTimeout { device, secs, why });
        }
        Ok(Watchdog {
            file: Some(file),
            device,
            timeout: Duration::from_secs(got),
            safety_margin: settings.safety_margin,
            identity,
        })
    }

    /// Opens the device, configures it and closes it cleanly at once, the
    /// check `mainstay config check` makes. Returns what [`Watchdog::open`]
    /// found. The magic close leaves nothing armed, except on a driver with
    /// nowayout that sysfs did not reveal.
    pub fn probe(settings: &Settings) -> Result<Probe, WatchdogError> {
        let watchdog = Watchdog::open(settings)?;
        let probe = Probe {
            timeout: watchdog.timeout,
            identity: watchdog.identity.clone(),
        };
        watchdog.close_cleanly()?;
        Ok(probe)
    }

    /// Restarts the countdown: `WDIOC_KEEPALIVE`, or a one-byte write for a
    /// driver without it. Call it only when [`crate::may_feed`] allows it,
    /// or through a [`Feeder`].
    pub fn feed(&mut self) -> Result<(), WatchdogError> {
        feeder::feed(self).map_err(|source| WatchdogError::Feed {
            device: self.device.clone(),
            source,
        })
    }

    /// The magic close: writes `V` and closes, so that the kernel disarms the
    /// watchdog. Call it when the node stops leading, once PostgreSQL is no
    /// longer writable. A driver with nowayout ignores it (see the type's
    /// documentation); an error means the `V` could not be written, and the
    /// device was closed anyway (still armed).
    pub fn close_cleanly(self) -> Result<(), WatchdogError> {
        let device = self.device.clone();
        feeder::close_cleanly(self).map_err(|source| WatchdogError::Close { device, source })
    }

    /// A [`Feeder`] for this device, with [`Watchdog::horizon`].
    pub fn into_feeder(self) -> Feeder<Watchdog> {
        let horizon = self.horizon();
        Feeder::new(self, horizon)
    }

    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The timeout in force, as the driver reports it (whole seconds, no
    /// longer than asked).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long one feed keeps the machine alive for the feeding rule: the
    /// timeout in force plus the safety margin.
    pub fn horizon(&self) -> Duration {
        self.timeout.saturating_add(self.safety_margin)
    }

    /// What the driver says it is, for the log.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    fn file(&mut self) -> io::Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }
}

impl Device for Watchdog {
    fn keepalive(&mut self) -> io::Result<()> {
        sys::keepalive(&*self.file()?)
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file()?.write_all(bytes)
    }

    fn close(mut self) {
        // A close, nothing else: after a `V` the kernel disarms.
        drop(self.file.take());
    }
}

impl Drop for Watchdog {
    /// Keeps the descriptor open until the process exits: see the type's
    /// documentation for why a drop must not disarm (nor feed) the watchdog.
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            let _leaked = file.into_raw_fd();
        }
    }
}

/// What [`Watchdog::probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The timeout the driver set.
    pub timeout: Duration,
    pub identity: Identity,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timeout {} s, driver {}",
            self.timeout.as_secs(),
            self.identity
        )
    }
}

/// Closes cleanly a device that was refused after it was opened, so that it
/// does not stay armed; errors are moot (the refusal is reported).
fn disarm(mut file: File) {
    let _ = file.write_all(b"V");
    drop(file);
}

fn open_error(device: &Path, err: io::Error) -> WatchdogError {
    let device = device.to_path_buf();
    match err.raw_os_error() {
        Some(libc::ENOENT) => WatchdogError::Missing { device },
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => WatchdogError::Permission {
            device,
            source: err,
        },
        Some(libc::EBUSY) => WatchdogError::Busy { device },
        Some(libc::ENXIO | libc::ENODEV) => WatchdogError::NotAWatchdog {
            device,
            why: format!("no driver behind it: {err}"),
        },
        _ => WatchdogError::Open {
            device,
            source: err,
        },
    }
}

fn kind(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a device"
    }
}

/// The sysfs directory of the watchdog whose character device is `rdev`:
/// `/dev/watchdog` is the misc device 10:130, an alias of `watchdog0`
/// (unless a legacy driver outside the watchdog core holds it: then
/// `watchdog0` is another device, and the nowayout check may be wrong);
/// `/dev/watchdogN` has a directory of its own under `/sys/dev/char`.
fn sysfs_dir(rdev: u64) -> PathBuf {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    if (major, minor) == (MISC_MAJOR, WATCHDOG_MINOR) {
        PathBuf::from("/sys/class/watchdog/watchdog0")
    } else {
        PathBuf::from(format!("/sys/dev/char/{major}:{minor}"))
    }
}

/// Whether sysfs says the device's driver has nowayout set; `None` when it
/// cannot tell (an older kernel, a legacy driver).
fn nowayout(rdev: u64) -> Option<bool> {
    let text = fs::read_to_string(sysfs_dir(rdev).join("nowayout")).ok()?;
    parse_flag(&text)
}

fn parse_flag(text: &str) -> Option<bool> {
    match text.trim() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(device: &Path) -> Settings {
        Settings {
            device: device.to_path_buf(),
            timeout: Duration::from_secs(2),
            safety_margin: Duration::ZERO,
        }
    }

    #[test]
    fn a_missing_device_names_the_path_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        let err = Watchdog::open(&settings(&path)).unwrap_err();
        assert!(matches!(err, WatchdogError::Missing { .. }), "{err:?}");
        let text = err.to_string();
        for needle in [
            path.to_str().unwrap(),
            "does not exist",
            "modprobe softdog",
            "watchdog.mode = \"off\"",
        ] {
            assert!(text.contains(needle), "{text} lacks {needle}");
        }
    }

    #[test]
    fn a_regular_file_is_not_a_watchdog_and_is_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        fs::write(&path, "").unwrap();
        let err = Watchdog::open(&settings(&path)).unwrap_err();
        assert!(matches!(err, WatchdogError::NotAWatchdog { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("{} is not a watchdog device", path.display())),
            "{text}"
        );
        assert!(text.contains("a regular file"), "{text}");
        assert!(text.contains("/dev/watchdog"), "{text}");
        assert_eq!(fs::read(&path).unwrap(), b"", "nothing written to it");
        // A directory likewise.
        let err = Watchdog::open(&settings(dir.path())).unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
    }

    /// A character device that is not a watchdog gets through the checks
    /// before the open, and is refused by its answer to the first ioctl.
    #[test]
    fn a_character_device_without_watchdog_ioctls_is_refused() {
        let null = Path::new("/dev/null");
        assert!(
            fs::metadata(null).is_ok_and(|m| m.file_type().is_char_device()),
            "this test needs /dev/null"
        );
        let err = Watchdog::open(&settings(null)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, WatchdogError::NotAWatchdog { .. }), "{err:?}");
        assert!(
            text.contains("/dev/null is not a watchdog device"),
            "{text}"
        );
        assert!(text.contains("ENOTTY"), "{text}");
        let err = Watchdog::probe(&settings(null)).unwrap_err();
        assert!(matches!(err, WatchdogError::NotAWatchdog { .. }), "{err:?}");
    }

    #[test]
    fn a_timeout_below_one_second_is_refused_before_opening() {
        let mut s = settings(Path::new("/nonexistent/watchdog"));
        s.timeout = Duration::from_millis(900);
        let err = Watchdog::open(&s).unwrap_err();
        assert!(
            matches!(err, WatchdogError::SetTimeout { secs: 0, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("the device's timeout cannot be set to 0 s"),
            "{err}"
        );
    }

    #[test]
    fn errors_say_how_to_fix_them() {
        let device = PathBuf::from("/dev/watchdog");
        let denied = open_error(&device, io::Error::from_raw_os_error(libc::EACCES)).to_string();
        assert!(
            denied.contains("must run as root or have write access to /dev/watchdog"),
            "{denied}"
        );
        let busy = open_error(&device, io::Error::from_raw_os_error(libc::EBUSY)).to_string();
        assert!(busy.contains("already open"), "{busy}");
        let too_long = WatchdogError::TimeoutTooLong {
            device: device.clone(),
            asked: 2,
            got: 3,
        }
        .to_string();
        assert!(
            too_long.contains("asked for a 2 s timeout, the driver set 3 s"),
            "{too_long}"
        );
        let nowayout = WatchdogError::NoWayOut { device }.to_string();
        assert!(nowayout.contains("nowayout=0"), "{nowayout}");
    }

    #[test]
    fn sysfs_is_found_for_both_device_names() {
        // /dev/watchdog: misc 10:130 is watchdog0.
        let misc = libc::makedev(10, 130);
        assert_eq!(sysfs_dir(misc), Path::new("/sys/class/watchdog/watchdog0"));
        let own = libc::makedev(247, 1);
        assert_eq!(sysfs_dir(own), Path::new("/sys/dev/char/247:1"));
        assert_eq!(parse_flag("1\n"), Some(true));
        assert_eq!(parse_flag("0\n"), Some(false));
        assert_eq!(parse_flag(""), None);
    }

    #[test]
    fn the_identity_is_read_up_to_its_nul() {
        let mut info = sys::WatchdogInfo {
            options: WDIOF_SETTIMEOUT | WDIOF_MAGICCLOSE | WDIOF_KEEPALIVEPING,
            firmware_version: 0,
            identity: [0; 32],
        };
        info.identity[..17].copy_from_slice(b"Software Watchdog");
        let identity = Identity::from_info(&info);
        assert_eq!(identity.name, "Software Watchdog");
        assert!(identity.magic_close() && identity.settable_timeout());
        assert_eq!(identity.to_string(), "\"Software Watchdog\"");
        info.options = 0;
        let identity = Identity::from_info(&info);
        assert!(identity.to_string().contains("no magic close"));
    }
}
