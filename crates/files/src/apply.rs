//! The receiver's side: what a plan's steps do to its copy of the tree.
//!
//! - A file is written under a temporary name in its own directory
//!   (`.mainstay-tmp-...`, never replicated nor scanned), its bytes checked
//!   against the hash the source announced, fsynced, given its mode, owner
//!   and mtime, then renamed over the real name and the directory fsynced:
//!   a reader, or a crash at any instant, sees the old file or the new one,
//!   never half of one.
//! - An entry that must go but was not deleted at the source is moved
//!   aside into `<dir>.moved-aside/<UTC time>/<its path>`, beside the tree
//!   on the same filesystem (a rename: no copy, nothing lost), from where
//!   a person brings it back.
//! - Every path is checked first: relative, no `..`, and no symbolic link
//!   among its parents, so nothing outside the tree is ever written.

use crate::manifest::{Entry, Kind, valid_relative};
use std::fs::{self, File, FileTimes};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Names a receiver writes before a rename; scans skip them.
pub const TEMP_PREFIX: &str = ".mainstay-tmp-";

/// Why a write stopped, and whether what it wrote is worth keeping.
enum Failure {
    /// The body broke off: the bytes so far are good for a resume.
    Keep(io::Error),
    /// Wrong bytes, or the disk: nothing of it may stay.
    Discard(io::Error),
}

/// A replicated directory as a receiver writes it.
pub struct Receiver {
    root: PathBuf,
    aside: PathBuf,
}

/// The folder beside `root` that holds what was moved aside.
pub fn aside_dir(root: &Path) -> PathBuf {
    let mut name = root.file_name().unwrap_or_default().to_os_string();
    name.push(".moved-aside");
    root.with_file_name(name)
}

/// A folder name for one resync's moved-aside files: its UTC time,
/// without colons (e.g. `2026-12-07T03-27-49Z`).
pub fn aside_stamp(now: SystemTime) -> String {
    humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace(':', "-")
}

/// Owners are given back only by root (anyone else may not chown).
fn is_root() -> bool {
    mainstay_sys::process::geteuid() == 0
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// `relative` under `root`, once it is a plain relative path whose
/// parents are real directories (or missing), not links.
pub fn inside(root: &Path, relative: &str) -> io::Result<PathBuf> {
    if !valid_relative(relative) {
        return Err(invalid(format!(
            "{relative:?} is not a relative path inside the tree"
        )));
    }
    let mut at = root.to_path_buf();
    let parts: Vec<&str> = relative.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        at.push(part);
        if fs::symlink_metadata(&at).is_ok_and(|meta| meta.file_type().is_symlink()) {
            return Err(invalid(format!(
                "{relative:?}: {} is a symbolic link; nothing is read or written through one",
                at.display()
            )));
        }
    }
    Ok(root.join(relative))
}

/// Opens the regular file `relative` under `root` for reading, never
/// through a link (neither a parent nor the file itself).
pub fn open_inside(root: &Path, relative: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = inside(root, relative)?;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    if !file.metadata()?.is_file() {
        return Err(invalid(format!("{relative:?} is not a regular file")));
    }
    Ok(file)
}

impl Receiver {
    pub fn new(root: &Path) -> Receiver {
        Receiver {
            root: root.to_path_buf(),
            aside: aside_dir(root),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, relative: &str) -> io::Result<PathBuf> {
        inside(&self.root, relative)
    }

    /// Where a file's bytes gather before the rename: named by content, so
    /// that a transfer cut midway resumes into the same file.
    fn partial_path(&self, relative: &str, hash: &str) -> io::Result<PathBuf> {
        let path = self.path(relative)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let short = hash.get(..32).unwrap_or(hash);
        Ok(dir.join(format!("{TEMP_PREFIX}part-{short}")))
    }

    /// Bytes of `relative`'s announced content already here from a cut
    /// transfer: fetch from there.
    pub fn partial(&self, relative: &str, entry: &Entry) -> u64 {
        let Kind::File { size, hash } = &entry.kind else {
            return 0;
        };
        let Ok(temp) = self.partial_path(relative, hash) else {
            return 0;
        };
        match fs::symlink_metadata(&temp) {
            Ok(meta) if meta.is_file() && meta.len() < *size => meta.len(),
            _ => 0,
        }
    }

    /// Writes `relative` from `body`, which holds the announced bytes from
    /// `offset` on (the ones before are the partial file's); returns the
    /// bytes this call wrote. When the body breaks off, what arrived is
    /// kept for the next attempt; bytes that do not match the announcement
    /// (or a full disk) leave nothing behind.
    pub fn write_file(
        &self,
        relative: &str,
        entry: &Entry,
        offset: u64,
        body: impl Read,
    ) -> io::Result<u64> {
        let Kind::File { size, hash } = &entry.kind else {
            return Err(invalid(format!("{relative:?} is not announced as a file")));
        };
        let path = self.path(relative)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let temp = self.partial_path(relative, hash)?;
        let written = match self.write_temp(&temp, *size, hash, entry, offset, body) {
            Ok(written) => written,
            Err(Failure::Keep(e)) => return Err(e),
            Err(Failure::Discard(e)) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        };
        fs::rename(&temp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })?;
        File::open(&dir)?.sync_all()?;
        Ok(written)
    }

    fn write_temp(
        &self,
        temp: &Path,
        size: u64,
        hash: &str,
        entry: &Entry,
        offset: u64,
        mut body: impl Read,
    ) -> Result<u64, Failure> {
        let discard = Failure::Discard;
        let mut hasher = blake3::Hasher::new();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut file = if offset > 0 {
            // The bytes already here count towards the hash: read again,
            // a piece at a time.
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(temp)
                .map_err(discard)?;
            let mut left = offset;
            while left > 0 {
                let want = buffer.len().min(left as usize);
                file.read_exact(&mut buffer[..want]).map_err(discard)?;
                hasher.update(&buffer[..want]);
                left -= want as u64;
            }
            file.set_len(offset).map_err(discard)?;
            file
        } else {
            File::create(temp).map_err(discard)?
        };
        let mut written = offset;
        loop {
            let n = match body.read(&mut buffer) {
                Ok(n) => n,
                // Cut: keep what arrived (on disk) for the next attempt.
                Err(e) => {
                    let _ = file.sync_data();
                    return Err(Failure::Keep(e));
                }
            };
            if n == 0 {
                break;
            }
            written += n as u64;
            if written > size {
                return Err(discard(invalid(format!(
                    "more than the {size} bytes announced"
                ))));
            }
            hasher.update(&buffer[..n]);
            file.write_all(&buffer[..n]).map_err(discard)?;
        }
        let got = hasher.finalize().to_hex();
        if written != size || got.as_str() != hash {
            return Err(discard(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "got {written} bytes hashing {got}, announced {size} hashing {hash}: \
                     the file changed while it was sent"
                ),
            )));
        }
        file.sync_all().map_err(discard)?;
        set_file_metadata(&file, temp, entry).map_err(discard)?;
        Ok(written - offset)
    }

    pub fn make_dir(&self, relative: &str, entry: &Entry) -> io::Result<()> {
        let path = self.path(relative)?;
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => return Err(e),
        }
        set_file_metadata(&File::open(&path)?, &path, entry)
    }

    /// Creates (or replaces) the link `relative`, atomically.
    pub fn make_link(&self, relative: &str, entry: &Entry) -> io::Result<()> {
        let Kind::Symlink { target } = &entry.kind else {
            return Err(invalid(format!("{relative:?} is not announced as a link")));
        };
        let path = self.path(relative)?;
        let dir = path.parent().unwrap_or(&self.root);
        let temp = dir.join(format!("{TEMP_PREFIX}{}-link", std::process::id()));
        let _ = fs::remove_file(&temp);
        std::os::unix::fs::symlink(target, &temp)?;
        if is_root() {
            std::os::unix::fs::lchown(&temp, Some(entry.uid), Some(entry.gid))?;
        }
        fs::rename(&temp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })
    }

    /// Mode, owner and mtime of an entry whose content is already right.
    pub fn set_metadata(&self, relative: &str, entry: &Entry) -> io::Result<()> {
        let path = self.path(relative)?;
        match entry.kind {
            Kind::Symlink { .. } => {
                if is_root() {
                    std::os::unix::fs::lchown(&path, Some(entry.uid), Some(entry.gid))?;
                }
                Ok(())
            }
            _ => set_file_metadata(&File::open(&path)?, &path, entry),
        }
    }

    /// Deletes a file or link the source deleted.
    pub fn delete(&self, relative: &str) -> io::Result<()> {
        let path = self.path(relative)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Removes directory `relative` if nothing is left in it.
    pub fn remove_dir_if_empty(&self, relative: &str) -> io::Result<bool> {
        let path = self.path(relative)?;
        match fs::remove_dir(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Moves `relative` into `<dir>.moved-aside/<stamp>/relative`; returns
    /// its size (0 for a link).
    pub fn move_aside(&self, relative: &str, stamp: &str) -> io::Result<u64> {
        let path = self.path(relative)?;
        let meta = fs::symlink_metadata(&path)?;
        let target = self.aside.join(stamp).join(relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(&path, &target)?;
        File::open(path.parent().unwrap_or(&self.root))?.sync_all()?;
        Ok(if meta.file_type().is_file() {
            meta.len()
        } else {
            0
        })
    }
}

fn set_file_metadata(file: &File, path: &Path, entry: &Entry) -> io::Result<()> {
    if is_root() {
        std::os::unix::fs::fchown(file, Some(entry.uid), Some(entry.gid))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(entry.mode))?;
    let mtime = if entry.mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(entry.mtime_ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(entry.mtime_ns.unsigned_abs())
    };
    file.set_times(FileTimes::new().set_modified(mtime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{HashCache, scan};
    use crate::spec::Excludes;

    fn entry_for(content: &[u8], mode: u32) -> Entry {
        Entry {
            kind: Kind::File {
                size: content.len() as u64,
                hash: blake3::hash(content).to_hex().to_string(),
            },
            mode,
            uid: 0,
            gid: 0,
            mtime_ns: 1_700_000_000_123_456_789,
        }
    }

    #[test]
    fn a_file_arrives_whole_with_its_mode_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let receiver = Receiver::new(dir.path());
        let entry = entry_for(b"voice note", 0o640);
        assert_eq!(
            receiver
                .write_file("note", &entry, 0, &b"voice note"[..])
                .unwrap(),
            10
        );
        let scanned = scan(dir.path(), &Excludes::none(), &mut HashCache::default()).unwrap();
        let mut expected = entry.clone();
        expected.uid = scanned.manifest["note"].uid;
        expected.gid = scanned.manifest["note"].gid;
        assert_eq!(scanned.manifest["note"], expected);
    }

    #[test]
    fn bytes_that_do_not_match_the_announcement_never_reach_the_real_name() {
        let dir = tempfile::tempdir().unwrap();
        let receiver = Receiver::new(dir.path());
        std::fs::write(dir.path().join("photo"), b"old photo").unwrap();
        let entry = entry_for(b"new photo", 0o644);
        for body in [&b"new phot"[..], &b"new photo!"[..], &b"NEW PHOTO"[..]] {
            let err = receiver.write_file("photo", &entry, 0, body).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput
                ),
                "{err}"
            );
            assert_eq!(
                std::fs::read(dir.path().join("photo")).unwrap(),
                b"old photo"
            );
        }
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A body that breaks off after `at` bytes.
    struct Cut<'a>(&'a [u8], usize);

    impl Read for Cut<'_> {
        fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
            if self.1 == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "cable pulled",
                ));
            }
            let n = buffer.len().min(self.1).min(self.0.len());
            buffer[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            self.1 -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_cut_transfer_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let receiver = Receiver::new(dir.path());
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let entry = entry_for(&content, 0o644);
        let err = receiver
            .write_file("video", &entry, 0, Cut(&content, 100_000))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(!dir.path().join("video").exists());
        assert_eq!(receiver.partial("video", &entry), 100_000);
        // The rest only: 200,000 bytes more, and the whole file is right.
        let written = receiver
            .write_file("video", &entry, 100_000, &content[100_000..])
            .unwrap();
        assert_eq!(written, 200_000);
        assert_eq!(std::fs::read(dir.path().join("video")).unwrap(), content);
        assert_eq!(receiver.partial("video", &entry), 0);
        // A resume whose bytes do not fit the announcement leaves nothing.
        let other = entry_for(&[1u8; 50_000], 0o644);
        let _ = receiver.write_file("other", &other, 0, Cut(&[1u8; 50_000], 20_000));
        assert_eq!(receiver.partial("other", &other), 20_000);
        assert!(
            receiver
                .write_file("other", &other, 20_000, &[2u8; 30_000][..])
                .is_err()
        );
        assert_eq!(receiver.partial("other", &other), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn nothing_is_written_outside_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let receiver = Receiver::new(dir.path());
        let entry = entry_for(b"x", 0o644);
        for path in ["../escape", "/etc/x", "link/x", "a/../../x", ""] {
            assert!(
                receiver.write_file(path, &entry, 0, &b"x"[..]).is_err(),
                "{path}"
            );
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn moved_aside_files_keep_their_path_under_a_dated_folder() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("media");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/late"), b"written after the crash").unwrap();
        let receiver = Receiver::new(&root);
        let stamp = aside_stamp(UNIX_EPOCH + Duration::from_secs(1_796_613_000));
        assert_eq!(stamp, "2026-12-07T03-10-00Z");
        assert_eq!(receiver.move_aside("a/b/late", &stamp).unwrap(), 23);
        assert!(!root.join("a/b/late").exists());
        let kept = base
            .path()
            .join("media.moved-aside")
            .join(&stamp)
            .join("a/b/late");
        assert_eq!(std::fs::read(kept).unwrap(), b"written after the crash");
        assert!(!receiver.remove_dir_if_empty("a").unwrap());
        assert!(receiver.remove_dir_if_empty("a/b").unwrap());
        assert!(receiver.remove_dir_if_empty("a").unwrap());
    }

    #[test]
    fn links_are_made_as_links_and_dates_are_civil() {
        let dir = tempfile::tempdir().unwrap();
        let receiver = Receiver::new(dir.path());
        let link = Entry {
            kind: Kind::Symlink {
                target: "/nowhere".into(),
            },
            ..entry_for(b"", 0o777)
        };
        receiver.make_link("l", &link).unwrap();
        receiver.make_link("l", &link).unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("l")).unwrap(),
            Path::new("/nowhere")
        );
        assert_eq!(aside_stamp(UNIX_EPOCH), "1970-01-01T00-00-00Z");
        assert_eq!(
            aside_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00-00-00Z"
        );
    }
}
