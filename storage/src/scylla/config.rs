//! Where the Scylla store is and how it talks to it: `scylla://host:port[,host:port]/keyspace`,
//! the consistency level, the replication of the keyspace `migrate` creates, the request
//! timeout.

use crate::model::InvalidValue;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The consistency level of every read and write. `LOCAL_QUORUM` (the default) makes a
/// write that returned visible to every later `LOCAL_QUORUM` read in the datacenter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// `ONE`
    One,
    /// `LOCAL_ONE`
    LocalOne,
    /// `QUORUM`
    Quorum,
    /// `LOCAL_QUORUM`
    #[default]
    LocalQuorum,
    /// `EACH_QUORUM` (writes only in Scylla; reads fall back to `QUORUM` there)
    EachQuorum,
    /// `ALL`
    All,
}

impl Consistency {
    const NAMES: [(&'static str, Consistency); 6] = [
        ("one", Consistency::One),
        ("local_one", Consistency::LocalOne),
        ("quorum", Consistency::Quorum),
        ("local_quorum", Consistency::LocalQuorum),
        ("each_quorum", Consistency::EachQuorum),
        ("all", Consistency::All),
    ];

    pub(crate) fn driver(self) -> scylla::statement::Consistency {
        use scylla::statement::Consistency as C;
        match self {
            Consistency::One => C::One,
            Consistency::LocalOne => C::LocalOne,
            Consistency::Quorum => C::Quorum,
            Consistency::LocalQuorum => C::LocalQuorum,
            Consistency::EachQuorum => C::EachQuorum,
            Consistency::All => C::All,
        }
    }
}

impl FromStr for Consistency {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        Self::NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, c)| *c)
            .ok_or(InvalidValue {
                field: "consistency",
                reason: "must be one of one, local_one, quorum, local_quorum, each_quorum, all",
            })
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(_, c)| c == self)
            .map_or("local_quorum", |(n, _)| n);
        f.write_str(name)
    }
}

/// The replication of the keyspace `migrate` creates (an existing keyspace is left as it
/// is): `SimpleStrategy:N` (one datacenter, N replicas) or
/// `NetworkTopologyStrategy:dc1=3,dc2=3` (N replicas in each named datacenter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// `SimpleStrategy` with this replication factor.
    Simple(u32),
    /// `NetworkTopologyStrategy` with a replication factor per datacenter.
    NetworkTopology(Vec<(String, u32)>),
}

impl Default for Replication {
    fn default() -> Self {
        Replication::Simple(1)
    }
}

impl Replication {
    /// The `replication = {...}` map of `CREATE KEYSPACE`.
    pub fn cql(&self) -> String {
        match self {
            Replication::Simple(n) => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {n}}}")
            }
            Replication::NetworkTopology(dcs) => {
                let mut out = String::from("{'class': 'NetworkTopologyStrategy'");
                for (dc, n) in dcs {
                    out.push_str(&format!(", '{dc}': {n}"));
                }
                out.push('}');
                out
            }
        }
    }
}

impl FromStr for Replication {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = InvalidValue {
            field: "replication",
            reason:
                "must be SimpleStrategy:N or NetworkTopologyStrategy:dc=N[,dc=N] (N from 1 to 99)",
        };
        let factor = |n: &str| {
            n.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..100).contains(n))
                .ok_or(bad.clone())
        };
        let (class, rest) = s.trim().split_once(':').ok_or(bad.clone())?;
        match class.trim() {
            "SimpleStrategy" => Ok(Replication::Simple(factor(rest)?)),
            "NetworkTopologyStrategy" => {
                let mut dcs = Vec::new();
                for part in rest.split(',') {
                    let (dc, n) = part.split_once('=').ok_or(bad.clone())?;
                    let dc = dc.trim();
                    let safe = !dc.is_empty()
                        && dc
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                    if !safe {
                        return Err(bad);
                    }
                    dcs.push((dc.to_owned(), factor(n)?));
                }
                Ok(Replication::NetworkTopology(dcs))
            }
            _ => Err(bad),
        }
    }
}

/// Everything the Scylla store needs to connect and migrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaConfig {
    /// Contact points, `host:port` (the driver discovers the rest of the cluster).
    pub nodes: Vec<String>,
    /// The keyspace of the store's tables.
    pub keyspace: String,
    /// Consistency of every statement.
    pub consistency: Consistency,
    /// Deadline of one request (the driver's retry policy retries idempotent statements
    /// within the store call's own deadline).
    pub request_timeout: Duration,
    /// Replication of the keyspace `migrate` creates.
    pub replication: Replication,
}

impl ScyllaConfig {
    /// Whether `url` names a Scylla store (`scylla://...`).
    pub fn is_scylla_url(url: &str) -> bool {
        url.starts_with("scylla://")
    }

    /// Parses `scylla://host:port[,host:port]/keyspace`; the other settings take their
    /// defaults (`LOCAL_QUORUM`, 2 s requests, `SimpleStrategy:1`).
    pub fn from_url(url: &str) -> Result<Self, InvalidValue> {
        let bad = |reason| InvalidValue {
            field: "store.url",
            reason,
        };
        let rest = url
            .strip_prefix("scylla://")
            .ok_or(bad("must start with scylla://"))?;
        let (hosts, keyspace) = rest
            .split_once('/')
            .ok_or(bad("must name the keyspace: scylla://host:port/keyspace"))?;
        let nodes: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if nodes.is_empty() {
            return Err(bad("must name at least one host:port"));
        }
        if nodes.iter().any(|n| {
            n.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        }) {
            return Err(bad("each node must be host:port"));
        }
        let keyspace_ok = !keyspace.is_empty()
            && keyspace.len() <= 48
            && keyspace.starts_with(|c: char| c.is_ascii_alphabetic())
            && keyspace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !keyspace_ok {
            return Err(bad(
                "the keyspace must be 1 to 48 letters, digits or '_', starting with a letter",
            ));
        }
        Ok(ScyllaConfig {
            nodes,
            keyspace: keyspace.to_owned(),
            consistency: Consistency::default(),
            request_timeout: Duration::from_secs(2),
            replication: Replication::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_settings_parse_and_bad_ones_are_refused() {
        let c = ScyllaConfig::from_url("scylla://127.0.0.1:9042,10.0.0.2:9042/flashsale")
            .expect("valid");
        assert_eq!(c.nodes, vec!["127.0.0.1:9042", "10.0.0.2:9042"]);
        assert_eq!(c.keyspace, "flashsale");
        assert_eq!(c.consistency, Consistency::LocalQuorum);
        for bad in [
            "postgres://x/y",
            "scylla://127.0.0.1:9042",
            "scylla:///ks",
            "scylla://host/ks",
            "scylla://h:9042/1ks",
            "scylla://h:9042/k-s",
        ] {
            assert!(ScyllaConfig::from_url(bad).is_err(), "{bad}");
        }
        assert_eq!("QUORUM".parse::<Consistency>(), Ok(Consistency::Quorum));
        assert!("two".parse::<Consistency>().is_err());
        assert_eq!(
            "NetworkTopologyStrategy:dc1=3,dc2=2"
                .parse::<Replication>()
                .expect("nts")
                .cql(),
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"
        );
        assert_eq!(
            "SimpleStrategy:3".parse::<Replication>(),
            Ok(Replication::Simple(3))
        );
        for bad in [
            "SimpleStrategy",
            "SimpleStrategy:0",
            "Other:1",
            "NetworkTopologyStrategy:dc'=1",
        ] {
            assert!(bad.parse::<Replication>().is_err(), "{bad}");
        }
    }
}
