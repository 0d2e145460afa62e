//! A real Redis Cluster on loopback for integration tests: `redis-server` nodes in a temp dir,
//! joined with `redis-cli --cluster create`, inspected through plain per-node connections.

use std::{
    collections::BTreeMap,
    future::Future,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redis::Value;

/// How long any wait on the cluster may take before the harness panics.
const WAIT: Duration = Duration::from_secs(30);
/// How long one command to one node may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Slots of a Redis Cluster.
const SLOTS: u32 = 16384;

/// A real Redis Cluster on loopback: `masters` masters with `replicas` replicas each, started
/// in a temp dir, stopped (all processes killed) on drop.
pub struct RedisCluster {
    /// Live nodes: client port → process.
    nodes: BTreeMap<u16, Child>,
    /// Holds every node's dir (`nodes.conf`); removed after the nodes are killed.
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts `masters * (1 + replicas)` nodes, creates the cluster and waits until every node
    /// says `cluster_state:ok` and every replica's link to its master is up.
    pub async fn start(masters: usize, replicas: usize) -> Self {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters");
        let count = masters * (1 + replicas);
        let (nodes, dir) = (BTreeMap::new(), tempfile::tempdir().expect("a temp dir"));
        let mut cluster = Self { nodes, dir };
        // Client and bus ports all picked at once, so they are distinct.
        let ports = free_ports(2 * count);
        for pair in ports.chunks(2) {
            let (port, bus) = (pair[0], pair[1]);
            let node_dir = cluster.dir.path().join(port.to_string());
            std::fs::create_dir(&node_dir).expect("a node dir");
            // `--cluster-port`: the default (port + 10000) is out of range for high ports.
            let flags = format!(
                "--port {port} --cluster-port {bus} --cluster-enabled yes \
                 --cluster-config-file nodes.conf --cluster-node-timeout 1000 \
                 --appendonly no --bind 127.0.0.1"
            );
            let child = Command::new("redis-server")
                .args(flags.split_whitespace())
                .args(["--save", "", "--dir"])
                .arg(&node_dir)
                .current_dir(&node_dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server runs (./scripts/test-all.sh installs it)");
            cluster.nodes.insert(port, child);
        }
        let this = &cluster;
        wait_until("nodes answer PING", || this.all_answer()).await;

        let mut create = Command::new("redis-cli");
        create
            .args(["--cluster", "create"])
            .args(this.nodes.keys().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = tokio::task::spawn_blocking(move || create.output())
            .await
            .expect("redis-cli joined")
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until("cluster ready", || this.ready(masters * replicas)).await;
        cluster
    }

    /// Seed URLs `redis://127.0.0.1:PORT` of every live node (for `[cluster] redis_cluster`).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .keys()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The TOML value: `["redis://127.0.0.1:P1", ...]`.
    pub fn seeds_toml(&self) -> String {
        let quoted: Vec<String> = self.seeds().iter().map(|s| format!("\"{s}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Ports of the current masters (live, serving slots) per `CLUSTER NODES` of a live node.
    pub async fn master_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .view()
            .await
            .into_iter()
            .filter(|n| n.master && !n.failed && !n.slots.is_empty())
            .filter(|n| self.nodes.contains_key(&n.port))
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The port of the master currently serving `key`'s hash slot (`CLUSTER KEYSLOT`, then
    /// `CLUSTER NODES` of a live node).
    pub async fn master_port_of(&self, key: &str) -> u16 {
        let port = self.any_port();
        let slot = self.cmd(port, &["CLUSTER", "KEYSLOT", key]).await;
        let slot: u32 = redis::from_redis_value(&slot.expect("CLUSTER KEYSLOT")).unwrap();
        self.view()
            .await
            .into_iter()
            .find(|n| {
                n.master && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .unwrap_or_else(|| panic!("no master serves slot {slot} ({key})"))
            .port
    }

    /// Kills (SIGKILL) the master on `port` and waits until the other masters serve all slots
    /// and `CLUSTER INFO` says `cluster_state:ok` on every live node (panics after 30 s).
    pub async fn kill_master_and_wait_failover(&mut self, port: u16) {
        let mut child = self
            .nodes
            .remove(&port)
            .unwrap_or_else(|| panic!("no live node on {port}"));
        child.kill().expect("SIGKILL the master");
        let _ = child.wait();
        let this = &*self;
        wait_until(&format!("failover of {port}"), || this.failed_over(port)).await;
    }

    /// `PUBSUB SHARDNUMSUB channel` asked of the node on `port` only: its sharded subscribers.
    pub async fn shard_subscribers(&self, port: u16, channel: &str) -> u64 {
        let reply = self.cmd(port, &["PUBSUB", "SHARDNUMSUB", channel]).await;
        let (_, n): (String, u64) = redis::from_redis_value(&reply.expect("SHARDNUMSUB")).unwrap();
        n
    }

    /// `cmdstat_spublish:calls=` of `INFO commandstats` of the node on `port` only: how many
    /// `SPUBLISH` it served (0 before the first).
    pub async fn spublish_calls(&self, port: u16) -> u64 {
        let stats = self
            .text(port, &["INFO", "commandstats"])
            .await
            .expect("INFO commandstats");
        field(&stats, "cmdstat_spublish")
            .and_then(|v| v.strip_prefix("calls="))
            .and_then(|v| v.split(',').next())
            .map_or(0, |n| n.parse().expect("a call count"))
    }

    /// Runs a command (`args[0]` is its name) on the node at `port` only, over a plain connection.
    pub async fn cmd(&self, port: u16, args: &[&str]) -> redis::RedisResult<Value> {
        let run = async {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
            let mut con = client.get_multiplexed_async_connection().await?;
            redis::cmd(args[0])
                .arg(&args[1..])
                .query_async::<Value>(&mut con)
                .await
        };
        tokio::time::timeout(COMMAND_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err((redis::ErrorKind::IoError, "command timed out").into()))
    }

    /// A command's reply as text (`INFO`, `CLUSTER INFO`, `CLUSTER NODES`).
    async fn text(&self, port: u16, args: &[&str]) -> redis::RedisResult<String> {
        redis::from_redis_value(&self.cmd(port, args).await?)
    }

    fn any_port(&self) -> u16 {
        *self.nodes.keys().next().expect("a live node")
    }

    /// `CLUSTER NODES` as a live node sees it.
    async fn view(&self) -> Vec<NodeLine> {
        let text = self.text(self.any_port(), &["CLUSTER", "NODES"]).await;
        parse_nodes(&text.expect("CLUSTER NODES"))
    }

    /// Every node answers `PING`.
    async fn all_answer(&self) -> bool {
        for &port in self.nodes.keys() {
            if self.cmd(port, &["PING"]).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Every node says `cluster_state:ok`, and `replicas` replicas have their master link up.
    async fn ready(&self, replicas: usize) -> bool {
        let mut linked = 0;
        for &port in self.nodes.keys() {
            let (Ok(info), Ok(repl)) = (
                self.text(port, &["CLUSTER", "INFO"]).await,
                self.text(port, &["INFO", "replication"]).await,
            ) else {
                return false;
            };
            if field(&info, "cluster_state") != Some("ok") {
                return false;
            }
            if field(&repl, "role") == Some("slave") {
                if field(&repl, "master_link_status") != Some("up") {
                    return false;
                }
                linked += 1;
            }
        }
        linked == replicas
    }

    /// Every live node says `cluster_state:ok` and sees all slots on live masters, none on `dead`.
    async fn failed_over(&self, dead: u16) -> bool {
        for &port in self.nodes.keys() {
            let (Ok(info), Ok(nodes)) = (
                self.text(port, &["CLUSTER", "INFO"]).await,
                self.text(port, &["CLUSTER", "NODES"]).await,
            ) else {
                return false;
            };
            let nodes = parse_nodes(&nodes);
            let served: u32 = nodes
                .iter()
                .filter(|n| n.master && !n.failed && n.port != dead)
                .flat_map(|n| n.slots.iter().map(|&(a, b)| b - a + 1))
                .sum();
            if field(&info, "cluster_state") != Some("ok")
                || served != SLOTS
                || nodes.iter().any(|n| n.port == dead && !n.slots.is_empty())
            {
                return false;
            }
        }
        true
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.nodes.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One line of `CLUSTER NODES`.
struct NodeLine {
    port: u16,
    master: bool,
    /// Flagged `fail` or `fail?`.
    failed: bool,
    /// Inclusive slot ranges it serves.
    slots: Vec<(u32, u32)>,
}

/// `<id> <ip:port@cport[,host]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = f.get(1)?.split(['@', ',']).next()?;
            let flags: Vec<&str> = f.get(2)?.split(',').collect();
            // Skips `[slot->-id]` / `[slot-<-id]` (slots migrating or importing).
            let slots = f
                .get(8..)
                .unwrap_or_default()
                .iter()
                .filter(|s| !s.starts_with('['));
            Some(NodeLine {
                port: addr.rsplit(':').next()?.parse().ok()?,
                master: flags.contains(&"master"),
                failed: flags.contains(&"fail") || flags.contains(&"fail?"),
                slots: slots
                    .filter_map(|s| {
                        let (a, b) = s.split_once('-').unwrap_or((s, s));
                        Some((a.parse().ok()?, b.parse().ok()?))
                    })
                    .collect(),
            })
        })
        .collect()
}

/// The value of `key:value` in an `INFO`-style reply.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// `n` distinct free loopback ports (listeners all held until every port is known).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("an address").port())
        .collect()
}

/// Polls `check` every 100 ms; panics if it is not true within 30 s.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "redis cluster: {what}: not in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hash_tags_spread_and_spublish_is_counted_where_served() {
        let cluster = RedisCluster::start(3, 0).await;
        let masters = cluster.master_ports().await;
        assert_eq!(masters.len(), 3);
        assert_eq!(cluster.seeds().len(), 3);
        assert!(cluster.seeds_toml().starts_with("[\"redis://127.0.0.1:"));

        // Two room tags served by different masters.
        let (a, pa) = ("{room:a}", cluster.master_port_of("{room:a}").await);
        let mut other = None;
        for tag in ["b", "c", "d", "e", "f", "g", "h", "i", "j", "k"] {
            let key = format!("{{room:{tag}}}");
            let port = cluster.master_port_of(&key).await;
            if port != pa {
                other = Some((key, port));
                break;
            }
        }
        let (b, pb) = other.expect("a room tag on another master");
        assert!(
            masters.contains(&pa) && masters.contains(&pb) && pa != pb,
            "{a} {b}"
        );

        // A sharded subscriber on `a`'s master, over a raw connection.
        let mut sub = tokio::net::TcpStream::connect(("127.0.0.1", pa))
            .await
            .unwrap();
        let req = format!("*2\r\n$10\r\nSSUBSCRIBE\r\n${}\r\n{a}\r\n", a.len());
        sub.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0; 256];
        let n = sub.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("ssubscribe"));
        assert_eq!(cluster.shard_subscribers(pa, a).await, 1);
        assert_eq!(cluster.shard_subscribers(pb, a).await, 0);

        let before: Vec<u64> =
            futures_util::future::join_all(masters.iter().map(|&p| cluster.spublish_calls(p)))
                .await;
        let reply = cluster.cmd(pa, &["SPUBLISH", a, "hello"]).await.unwrap();
        assert_eq!(reply, Value::Int(1));
        for (&port, before) in masters.iter().zip(before) {
            let expected = before + u64::from(port == pa);
            assert_eq!(cluster.spublish_calls(port).await, expected, "port {port}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replica_takes_over_a_killed_master() {
        let mut cluster = RedisCluster::start(3, 1).await;
        assert_eq!(cluster.seeds().len(), 6);
        let key = "{room:a}:state";
        let old = cluster.master_port_of(key).await;
        cluster.kill_master_and_wait_failover(old).await;

        let new = cluster.master_port_of(key).await;
        assert_ne!(new, old);
        let masters = cluster.master_ports().await;
        assert_eq!(masters.len(), 3);
        assert!(masters.contains(&new) && !masters.contains(&old));
        let set = cluster.cmd(new, &["SET", key, "v"]).await.unwrap();
        assert_eq!(set, Value::Okay);
        let got = cluster.cmd(new, &["GET", key]).await.unwrap();
        assert_eq!(got, Value::BulkString(b"v".to_vec()));
    }
}
