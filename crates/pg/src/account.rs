//! The OS account PostgreSQL runs as, and files written for it. When the
//! agent is root, PostgreSQL must run as another user and everything it reads
//! (data directory, socket directory, password file) must belong to that user.

use crate::error::{Error, Result};
use mainstay_sys::{process, user};
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Who runs PostgreSQL and its tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// Processes must switch to this account (we are someone else, i.e. root).
    pub switch: bool,
}

impl Account {
    /// The same account's environment for a process that keeps this
    /// process's credentials (the fencing guard switches only its child).
    pub fn unswitched(&self) -> Account {
        Account {
            switch: false,
            ..self.clone()
        }
    }

    /// Resolves `run_as`, or the current user when `None`.
    pub fn resolve(run_as: Option<&str>) -> Result<Account> {
        let euid = process::geteuid();
        let mut account = match run_as {
            Some(name) => lookup(Lookup::Name(name))?,
            None => lookup(Lookup::Uid(euid))?,
        };
        account.switch = account.uid != euid;
        if account.switch && euid != 0 {
            return Err(Error::Config(format!(
                "cannot run PostgreSQL as {} (uid {}) without being root",
                account.name, account.uid
            )));
        }
        if account.uid == 0 {
            return Err(Error::Config(
                "PostgreSQL refuses to run as root: set run_as to an unprivileged user (e.g. postgres)".into(),
            ));
        }
        Ok(account)
    }

    /// Gives `path` to the account (no-op when we already are it).
    pub fn chown(&self, path: &Path) -> Result<()> {
        if self.switch {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
                .map_err(|e| Error::io_path("chown", path, e))?;
        }
        Ok(())
    }

    /// Creates `dir` (not its parents) with `mode`, owned by the account; an
    /// existing directory gets the owner and mode fixed.
    pub fn ensure_dir(&self, dir: &Path, mode: u32) -> Result<()> {
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(Error::io_path("create directory", dir, e)),
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io_path("chmod", dir, e))?;
        self.chown(dir)
    }

    /// Writes `path` atomically (temp file + rename) with `mode`, owned by the
    /// account, so PostgreSQL never reads a half-written file.
    pub fn write_file(&self, path: &Path, content: &[u8], mode: u32) -> Result<()> {
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let result = (|| {
            let _ = fs::remove_file(&tmp);
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .map_err(|e| Error::io_path("create", &tmp, e))?;
            // The mode given to open() is filtered by the umask.
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io_path("chmod", &tmp, e))?;
            self.chown(&tmp)?;
            file.write_all(content)
                .map_err(|e| Error::io_path("write", &tmp, e))?;
            file.sync_all()
                .map_err(|e| Error::io_path("fsync", &tmp, e))?;
            fs::rename(&tmp, path).map_err(|e| Error::io_path("rename into", path, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

enum Lookup<'a> {
    Name(&'a str),
    Uid(u32),
}

fn lookup(key: Lookup<'_>) -> Result<Account> {
    let shown = match &key {
        Lookup::Name(n) => n.to_string(),
        Lookup::Uid(u) => format!("uid {u}"),
    };
    let found = match key {
        Lookup::Name(name) => {
            let cname =
                CString::new(name).map_err(|_| Error::Config(format!("bad user name {name:?}")))?;
            user::by_name(&cname)
        }
        Lookup::Uid(uid) => user::by_uid(uid),
    };
    let user = found
        .map_err(|e| Error::io(format!("look up user {shown}"), e))?
        .ok_or_else(|| Error::Config(format!("no such OS user: {shown}")))?;
    Ok(Account {
        name: user.name,
        uid: user.uid,
        gid: user.gid,
        home: user.home,
        switch: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_root_by_name_and_refuses_it() {
        assert_eq!(lookup(Lookup::Name("root")).unwrap().uid, 0);
        assert!(lookup(Lookup::Name("no-such-user-mainstay")).is_err());
        if process::geteuid() == 0 {
            assert!(Account::resolve(None).is_err());
        }
    }
}
