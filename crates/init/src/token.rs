//! The join token: one line that carries what every node of a cluster
//! shares (its name, members, ports, virtual IP, credentials, and the CA
//! that signs each node's certificate) from the first node's `init` to the
//! others'. It is a secret: whoever holds it can join the cluster. It
//! expires, and names its cluster so that a token of another one is
//! refused.

use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "mainstay-join-1.";
/// A token is meant to be used while the servers are being set up.
pub const LIFETIME_SECS: u64 = 24 * 3600;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub cluster: String,
    /// Unix seconds after which the token is refused.
    pub expires: u64,
    pub members: Vec<Member>,
    pub ports: Ports,
    /// `10.0.0.50/24` and its interface, when the leader holds a VIP.
    pub vip: Option<(String, String)>,
    pub secrets: Secrets,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    pub address: std::net::IpAddr,
    pub witness: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    pub postgresql: u16,
    pub api: u16,
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub proxy: u16,
    pub read_only_proxy: u16,
}

impl Default for Ports {
    fn default() -> Ports {
        Ports {
            postgresql: 5432,
            api: 8008,
            etcd_client: 2379,
            etcd_peer: 2380,
            proxy: 5000,
            read_only_proxy: 5001,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    pub superuser_password: String,
    pub replication_password: String,
    pub api_password: String,
}

impl Token {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a token serializes");
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// The token in `text`, if it is one, is whole, and has not expired
    /// at `now` (Unix seconds).
    pub fn decode(text: &str, now: u64) -> Result<Token, String> {
        let fix = "copy the whole token that `mainstay init` printed on the first node, or \
                   print a new one there with `mainstay init --new-token`";
        let Some(body) = text.trim().strip_prefix(PREFIX) else {
            return Err(format!("this is not a mainstay join token: {fix}"));
        };
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| format!("the join token is damaged (not base64): {fix}"))?;
        let token: Token = serde_json::from_slice(&json)
            .map_err(|e| format!("the join token is damaged ({e}): {fix}"))?;
        if token.expires <= now {
            return Err(format!(
                "the join token of cluster {} expired {} minutes ago: {fix}",
                token.cluster,
                (now - token.expires) / 60
            ));
        }
        Ok(token)
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn example() -> Token {
        Token {
            cluster: "ship".into(),
            expires: 1_000,
            members: vec![
                Member {
                    name: "node1".into(),
                    address: "10.0.0.1".parse().unwrap(),
                    witness: false,
                },
                Member {
                    name: "bridge".into(),
                    address: "10.0.0.3".parse().unwrap(),
                    witness: true,
                },
            ],
            ports: Ports::default(),
            vip: Some(("10.0.0.50/24".into(), "eth0".into())),
            secrets: Secrets {
                superuser_password: "a".into(),
                replication_password: "b".into(),
                api_password: "c".into(),
            },
            ca_cert_pem: "cert".into(),
            ca_key_pem: "key".into(),
        }
    }

    #[test]
    fn a_token_round_trips_and_expires() {
        let token = example();
        let line = token.encode();
        assert!(line.starts_with(PREFIX) && !line.contains('\n'));
        assert_eq!(Token::decode(&format!("  {line}\n"), 999).unwrap(), token);
        let expired = Token::decode(&line, 1_000 + 600).unwrap_err();
        assert!(expired.contains("expired 10 minutes ago"), "{expired}");
    }

    #[test]
    fn what_is_not_a_whole_token_is_refused() {
        let line = example().encode();
        assert!(
            Token::decode("hello", 0)
                .unwrap_err()
                .contains("not a mainstay join token")
        );
        let cut = &line[..line.len() - 10];
        assert!(Token::decode(cut, 0).unwrap_err().contains("damaged"));
        assert!(
            Token::decode(&format!("{PREFIX}!!!"), 0)
                .unwrap_err()
                .contains("base64")
        );
    }
}
