//! `--iptables`: the DNAT that sends pods' metadata traffic to the agent, kept in place while the
//! agent runs.
//!
//! The rules live in a chain of our own ([`rules::DEFAULT_CHAIN`]), jumped to from the top of
//! `nat PREROUTING`, so that they are found, checked and removed without touching anybody
//! else's rules, and so that rules inserted later by Docker or kube-proxy cannot shadow them.
//! Every change is check-then-add, so starting twice, or next to a chain left by a previous
//! run (`--no-iptables-remove`), converges on the same two rules. A check loop restores them
//! when something else deletes them, and counts each restoration.
//!
//! When the agent also listens on the node's IPv6 address, the same two rules are kept with
//! `ip6tables` for the IPv6 endpoint (`fd00:ec2::254`). After each install or restoration, the
//! tracked flows that reach the metadata addresses themselves are deleted with `conntrack`, so
//! that a connection opened before the DNAT (a kept-alive one, or one opened while no agent ran)
//! cannot keep reaching the node's real service (kiam #284). Flows already sent to an agent are
//! kept, so that pods' connections opened meanwhile are not cut.
//!
//! The programs are run as child processes ([`Command`]) behind the [`Runner`] trait, so the
//! logic here is tested against a recording fake without root.

#[cfg(test)]
mod fake;
mod family;
pub mod rules;

use prometheus_client::metrics::counter::Counter;
use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use rules::{
    CONTAINER_IP, CONTAINER_IP6, Config, DEFAULT_CHAIN, Interface, METADATA_IP, METADATA_IP6, Rules,
};

/// How long one `iptables` command may take, waiting for the xtables lock included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Removal at shutdown is tried this many times (another program may hold the lock).
const REMOVE_ATTEMPTS: u32 = 5;
/// Upper bound on rules deleted in one pass, whatever is found in our chain.
const MAX_DELETIONS: usize = 1000;

/// What one `iptables` command ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Exit status 0. For `-C` and `-S`, a failure means "no such rule" or "no such chain".
    pub success: bool,
    /// Standard output (the rules, for `-S`).
    pub stdout: String,
    /// Standard error, for error messages.
    pub stderr: String,
}

/// Why the rules could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("iptables {args} did not finish within {COMMAND_TIMEOUT:?}")]
    Timeout { args: String },
    #[error("iptables {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// The programs (and tables) the rules are kept with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tool {
    /// `iptables -w -t nat`.
    Iptables,
    /// `ip6tables -w -t nat`.
    Ip6tables,
    /// `conntrack`.
    Conntrack,
    /// `iptables -w -t filter` (the connection limit).
    IptablesFilter,
    /// `ip6tables -w -t filter`.
    Ip6tablesFilter,
}

impl Tool {
    /// The tool for `rules` of one address family (`ipv6`).
    fn for_rules(rules: &Rules, ipv6: bool) -> Tool {
        match (rules.table, ipv6) {
            (rules::Table::Nat, false) => Tool::Iptables,
            (rules::Table::Nat, true) => Tool::Ip6tables,
            (rules::Table::Filter, false) => Tool::IptablesFilter,
            (rules::Table::Filter, true) => Tool::Ip6tablesFilter,
        }
    }
}

/// Runs one command. The seam between the rule logic and the system.
pub trait Runner: Send + Sync + 'static {
    /// Runs `iptables -w -t nat <args>`, `ip6tables -w -t nat <args>` or `conntrack <args>`.
    fn run(&self, tool: Tool, args: &[String])
    -> impl Future<Output = Result<Outcome, IptablesError>> + Send;
}

/// The real [`Runner`]: each program as a child process, `iptables` waiting for the xtables
/// lock (`-w`).
#[derive(Clone, Debug)]
pub struct Command {
    /// Leading words (`ip netns exec <node>`), if any.
    prefix: Vec<String>,
    /// The `iptables` program; `ip6tables` is named after it.
    iptables: String,
}

impl Default for Command {
    fn default() -> Command {
        Command { prefix: Vec::new(), iptables: "iptables".into() }
    }
}

impl Command {
    /// Runs `program` (its last element, with the rest as leading words) instead of
    /// `iptables`: `iptables-legacy`, say, or `ip netns exec <node> iptables`. `ip6tables` and
    /// `conntrack` run behind the same leading words, the former named alike
    /// (`ip6tables-legacy`).
    pub fn with_program(mut program: Vec<String>) -> Command {
        let iptables = program.pop().unwrap_or_else(|| "iptables".into());
        Command { prefix: program, iptables }
    }

    fn program(&self, tool: Tool) -> String {
        match tool {
            Tool::Iptables | Tool::IptablesFilter => self.iptables.clone(),
            Tool::Ip6tables | Tool::Ip6tablesFilter => self.iptables.replacen("iptables", "ip6tables", 1),
            Tool::Conntrack => "conntrack".into(),
        }
    }
}

impl Runner for Command {
    async fn run(&self, tool: Tool, args: &[String]) -> Result<Outcome, IptablesError> {
        let named = self.program(tool);
        let mut words = self.prefix.iter().chain(std::iter::once(&named));
        let program = words.next().map_or(named.as_str(), String::as_str).to_string();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(words);
        match tool {
            Tool::Conntrack => {}
            Tool::Iptables | Tool::Ip6tables => {
                cmd.args(["-w", "-t", "nat"]);
            }
            Tool::IptablesFilter | Tool::Ip6tablesFilter => {
                cmd.args(["-w", "-t", "filter"]);
            }
        }
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let spawn_error = |source| IptablesError::Spawn { program: named.clone(), source };
        let child = cmd.spawn().map_err(spawn_error)?;
        let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| IptablesError::Timeout { args: args.join(" ") })?
            .map_err(spawn_error)?;
        Ok(Outcome {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// The interception rules of one agent, and what keeps them in place.
pub struct Interception<R> {
    runner: R,
    rules: Rules,
    /// The IPv6 rules, when the agent listens on an IPv6 address too.
    rules6: Option<Rules>,
    /// The container endpoint's rules (`--container-endpoint`), IPv4 and, with an IPv6 target, IPv6.
    container: Option<Rules>,
    container6: Option<Rules>,
    /// The per-source connection limit (`--iptables-connlimit`), IPv4 and IPv6.
    limit: Option<Rules>,
    limit6: Option<Rules>,
    config: Config,
    /// `kiam_agent_iptables_restorations_total`, counted directly.
    restorations: Counter,
}

impl<R: Runner> Interception<R> {
    /// Rules for `config`, changed through `runner`.
    pub fn new(runner: R, config: Config) -> Interception<R> {
        let (rules, rules6) = (Rules::new(&config), Rules::new6(&config));
        let (container, container6) = (Rules::container(&config), Rules::container6(&config));
        let (limit, limit6) = (Rules::limit(&config), Rules::limit6(&config));
        Interception {
            runner,
            rules,
            rules6,
            container,
            container6,
            limit,
            limit6,
            config,
            restorations: Counter::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The IPv4 rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The IPv6 rules, if any.
    pub fn rules6(&self) -> Option<&Rules> {
        self.rules6.as_ref()
    }

    /// The container endpoint's rules, with `--container-endpoint`.
    pub fn container_rules(&self) -> Option<&Rules> {
        self.container.as_ref()
    }

    /// The container endpoint's IPv6 rules, with `--container-endpoint` and an IPv6 address.
    pub fn container_rules6(&self) -> Option<&Rules> {
        self.container6.as_ref()
    }

    /// The connection limit's IPv4 rules, with `--iptables-connlimit`.
    pub fn limit_rules(&self) -> Option<&Rules> {
        self.limit.as_ref()
    }

    /// How many times the check loop found the rules missing or changed and put them back.
    pub fn restorations(&self) -> u64 {
        self.restorations.get()
    }

    /// Counts restorations into `counter` (the process's registered metric).
    pub fn counting_into(mut self, counter: Counter) -> Interception<R> {
        self.restorations = counter;
        self
    }

    fn families(&self) -> impl Iterator<Item = family::Family<'_, R>> {
        let v4 = std::iter::once(&self.rules).chain(&self.container).chain(&self.limit);
        let v6 = self.rules6.iter().chain(&self.container6).chain(&self.limit6);
        let v4 = v4.map(|rules| (Tool::for_rules(rules, false), rules));
        let v6 = v6.map(|rules| (Tool::for_rules(rules, true), rules));
        v4.chain(v6).map(|(tool, rules)| family::Family { runner: &self.runner, tool, rules })
    }

    /// Makes the rules of every family what they should be; when anything changed, deletes the
    /// tracked flows that reach the metadata addresses, which would otherwise bypass the new DNAT.
    /// Returns whether anything changed.
    pub async fn install(&self) -> Result<bool, IptablesError> {
        let mut changed = false;
        for family in self.families() {
            changed |= family.install().await?;
        }
        if changed {
            for family in self.families() {
                family.flush_flows().await;
            }
        }
        Ok(changed)
    }

    /// Whether every family's rules are in place (and nothing else in our chains).
    pub async fn is_installed(&self) -> Result<bool, IptablesError> {
        for family in self.families() {
            if !family.is_installed().await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Deletes the jumps and our chains. Rules that are already gone are fine.
    pub async fn remove(&self) -> Result<(), IptablesError> {
        for family in self.families() {
            family.remove().await?;
        }
        Ok(())
    }

    /// [`Interception::remove`], retried a few times: a failure leaves pods intercepted by a rule
    /// pointing at a stopped agent, which fails closed but should be rare.
    pub async fn remove_with_retries(&self) -> Result<(), IptablesError> {
        let mut attempt = 1;
        loop {
            match self.remove().await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < REMOVE_ATTEMPTS => {
                    tracing::warn!(%error, attempt, "cannot remove the iptables rules yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Checks the rules every `check_interval` until `shutdown`, and restores them when they
    /// are missing or changed.
    pub async fn keep_installed(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.config.check_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate, and install() has just run
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.install().await {
                Ok(false) => {}
                Ok(true) => {
                    let n = self.restorations.inc() + 1;
                    tracing::warn!(chain = %self.rules.chain, restorations = n, "iptables rules were missing or changed; restored");
                }
                Err(error) => tracing::error!(%error, "cannot check the iptables rules"),
            }
        }
    }
}

#[cfg(test)]
mod tests;
