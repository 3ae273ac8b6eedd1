//! What the agent and the guard say to each other: one line per message,
//! plain text, over the socket that is the guard's standard input.
//!
//! Agent to guard:
//! - `arm <ns>`: PostgreSQL may accept writes until `<ns>` (`BootTime`);
//!   the latest `arm` replaces the previous deadline, earlier or later;
//! - `disarm`: PostgreSQL is not writable (a replica): no deadline;
//! - `signal <n>`: send signal `n` to the postmaster (the guard knows
//!   whether it has been reaped, so a signal never reaches a recycled pid);
//! - `fence`: stop PostgreSQL now.
//!
//! Guard to agent:
//! - `started <pid>`: the postmaster runs;
//! - `refused <why>`: the postmaster was not started (deadline passed);
//! - `fenced <why>`: the guard is stopping PostgreSQL on its own authority;
//! - `exited <raw wait status>`: the postmaster is gone; the guard exits.

use crate::clock::BootTime;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToGuard {
    Arm(BootTime),
    Disarm,
    Signal(i32),
    Fence,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FromGuard {
    Started(i32),
    Refused(String),
    Fenced(String),
    Exited(i32),
}

impl ToGuard {
    pub fn encode(&self) -> String {
        match self {
            ToGuard::Arm(at) => format!("arm {}\n", at.0),
            ToGuard::Disarm => "disarm\n".into(),
            ToGuard::Signal(n) => format!("signal {n}\n"),
            ToGuard::Fence => "fence\n".into(),
        }
    }

    /// One line without its newline; `None` for anything else.
    pub fn parse(line: &str) -> Option<ToGuard> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match (word, rest) {
            ("arm", ns) => ns.parse().ok().map(|ns| ToGuard::Arm(BootTime(ns))),
            ("disarm", "") => Some(ToGuard::Disarm),
            ("signal", n) => n.parse().ok().map(ToGuard::Signal),
            ("fence", "") => Some(ToGuard::Fence),
            _ => None,
        }
    }
}

impl FromGuard {
    pub fn encode(&self) -> String {
        let one_line = |s: &str| s.replace('\n', " ");
        match self {
            FromGuard::Started(pid) => format!("started {pid}\n"),
            FromGuard::Refused(why) => format!("refused {}\n", one_line(why)),
            FromGuard::Fenced(why) => format!("fenced {}\n", one_line(why)),
            FromGuard::Exited(raw) => format!("exited {raw}\n"),
        }
    }

    pub fn parse(line: &str) -> Option<FromGuard> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "started" => rest.parse().ok().map(FromGuard::Started),
            "refused" => Some(FromGuard::Refused(rest.into())),
            "fenced" => Some(FromGuard::Fenced(rest.into())),
            "exited" => rest.parse().ok().map(FromGuard::Exited),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_survives_a_round_trip() {
        for msg in [
            ToGuard::Arm(BootTime(123_456_789_012)),
            ToGuard::Disarm,
            ToGuard::Signal(2),
            ToGuard::Fence,
        ] {
            let line = msg.encode();
            assert_eq!(ToGuard::parse(line.trim_end_matches('\n')), Some(msg));
        }
        for msg in [
            FromGuard::Started(4242),
            FromGuard::Refused("deadline passed".into()),
            FromGuard::Fenced("agent gone".into()),
            FromGuard::Exited(0x0300),
        ] {
            let line = msg.encode();
            assert_eq!(FromGuard::parse(line.trim_end_matches('\n')), Some(msg));
        }
    }

    #[test]
    fn garbage_is_not_a_message() {
        for line in [
            "",
            "arm",
            "arm x",
            "arm -1",
            "disarm now",
            "signal",
            "fence 1",
            "ARM 1",
        ] {
            assert_eq!(ToGuard::parse(line), None, "{line:?}");
        }
        assert_eq!(FromGuard::parse("started"), None);
        assert_eq!(FromGuard::parse("hello"), None);
    }

    #[test]
    fn a_reason_cannot_inject_a_second_message() {
        let line = FromGuard::Fenced("a\nexited 0".into()).encode();
        assert_eq!(line.matches('\n').count(), 1);
    }
}
