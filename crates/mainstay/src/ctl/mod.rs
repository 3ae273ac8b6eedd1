//! `mainstay ctl`: the operator's command line, a client of any agent's REST
//! API.

pub mod client;
