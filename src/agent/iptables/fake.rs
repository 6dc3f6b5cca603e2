//! A [`Runner`] that keeps a `nat` and a `filter` table per family in memory and records every command, for
//! unit tests of the rule logic without root. It understands the commands the logic uses
//! (`-S`, `-N`, `-C`, `-I`, `-A`, `-D` by rule or number, `-F`, `-X`) with iptables' exit
//! semantics, and records `conntrack` calls apart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{IptablesError, Outcome, Runner, Tool};

/// The shared table; clones see the same state.
#[derive(Clone, Default)]
pub struct FakeIptables {
    state: Arc<Mutex<State>>,
}

type Table = BTreeMap<String, Vec<Vec<String>>>;

struct State {
    chains: Table,
    chains6: Table,
    /// The `filter` tables (IPv4, IPv6).
    filter: Table,
    filter6: Table,
    log: Vec<Vec<String>>,
    conntrack: Vec<Vec<String>>,
    fail: bool,
}

impl Default for State {
    fn default() -> State {
        let chains =
            BTreeMap::from([("PREROUTING".to_string(), Vec::new()), ("OUTPUT".to_string(), Vec::new())]);
        let filter = BTreeMap::from([("INPUT".to_string(), Vec::new())]);
        State {
            chains6: chains.clone(),
            chains,
            filter6: filter.clone(),
            filter,
            log: Vec::new(),
            conntrack: Vec::new(),
            fail: false,
        }
    }
}

fn ok(success: bool) -> Outcome {
    Outcome { success, stdout: String::new(), stderr: if success { "" } else { "no such rule" }.into() }
}

impl FakeIptables {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake iptables poisoned")
    }

    /// The rules of `chain`, `None` if it does not exist.
    pub fn chain(&self, chain: &str) -> Option<Vec<Vec<String>>> {
        self.state().chains.get(chain).cloned()
    }

    /// The IPv6 rules of `chain`, `None` if it does not exist.
    pub fn chain6(&self, chain: &str) -> Option<Vec<Vec<String>>> {
        self.state().chains6.get(chain).cloned()
    }

    /// The rules of `chain` in the IPv4 `filter` table, `None` if it does not exist.
    pub fn filter_chain(&self, chain: &str) -> Option<Vec<Vec<String>>> {
        self.state().filter.get(chain).cloned()
    }

    /// Every `conntrack` command run so far.
    pub fn conntrack(&self) -> Vec<Vec<String>> {
        self.state().conntrack.clone()
    }

    /// Puts a rule at the end of `chain`, creating the chain, as another program would.
    pub fn append(&self, chain: &str, rule: &[&str]) {
        let rule = rule.iter().map(|s| s.to_string()).collect();
        self.state().chains.entry(chain.to_string()).or_default().push(rule);
    }

    /// Puts a rule at the top of `chain`, as Docker or kube-proxy might after the agent started.
    pub fn insert_first(&self, chain: &str, rule: &[&str]) {
        let rule = rule.iter().map(|s| s.to_string()).collect();
        self.state().chains.entry(chain.to_string()).or_default().insert(0, rule);
    }

    /// Deletes every rule of `chain` equal to `rule`, as another program would.
    pub fn delete(&self, chain: &str, rule: &[String]) {
        if let Some(rules) = self.state().chains.get_mut(chain) {
            rules.retain(|r| r != rule);
        }
    }

    /// Every command run so far.
    pub fn log(&self) -> Vec<Vec<String>> {
        self.state().log.clone()
    }

    /// Forgets the log.
    pub fn clear_log(&self) {
        self.state().log.clear();
    }

    /// Makes every later command fail to run (as if iptables were missing), or run again.
    pub fn set_failing(&self, fail: bool) {
        self.state().fail = fail;
    }
}

impl Runner for FakeIptables {
    async fn run(&self, tool: Tool, args: &[String]) -> Result<Outcome, IptablesError> {
        let mut state = self.state();
        if state.fail {
            state.log.push(args.to_vec());
            return Err(IptablesError::Spawn {
                program: "iptables".into(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let table = match tool {
            Tool::Conntrack => {
                state.conntrack.push(args.to_vec());
                let stderr = "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.";
                return Ok(Outcome { success: false, stdout: String::new(), stderr: stderr.into() });
            }
            Tool::Iptables => {
                state.log.push(args.to_vec());
                &mut state.chains
            }
            Tool::Ip6tables => {
                state.log.push(args.to_vec());
                &mut state.chains6
            }
            Tool::IptablesFilter => {
                state.log.push(args.to_vec());
                &mut state.filter
            }
            Tool::Ip6tablesFilter => {
                state.log.push(args.to_vec());
                &mut state.filter6
            }
        };
        Ok(apply(table, args))
    }
}

/// One `iptables -t nat` command on `chains`.
fn apply(chains: &mut Table, args: &[String]) -> Outcome {
    let (op, chain, rest) = match args {
        [op, chain, rest @ ..] => (op.as_str(), chain.clone(), rest.to_vec()),
        _ => return ok(false),
    };
    let exists = chains.contains_key(&chain);
    match op {
        "-S" => match chains.get(&chain) {
            Some(rules) => {
                let mut text = format!("-N {chain}\n");
                for rule in rules {
                    text.push_str(&format!("-A {chain} {}\n", rule.join(" ")));
                }
                Outcome { success: true, stdout: text, stderr: String::new() }
            }
            None => ok(false),
        },
        "-N" if !exists => {
            chains.insert(chain, Vec::new());
            ok(true)
        }
        "-C" => ok(chains.get(&chain).is_some_and(|rules| rules.contains(&rest))),
        "-I" | "-A" if exists => {
            let rules = chains.entry(chain).or_default();
            match (op, rest.split_first()) {
                ("-I", Some((n, rule))) if n.parse::<usize>().is_ok() => {
                    let at = n.parse::<usize>().unwrap_or(1).saturating_sub(1).min(rules.len());
                    rules.insert(at, rule.to_vec());
                }
                ("-I", _) => rules.insert(0, rest),
                _ => rules.push(rest),
            }
            ok(true)
        }
        "-D" if exists => {
            let rules = chains.entry(chain).or_default();
            let index = match rest.as_slice() {
                [n] if n.parse::<usize>().is_ok() => n.parse::<usize>().ok().and_then(|n| n.checked_sub(1)),
                rule => rules.iter().position(|r| r == rule),
            };
            match index.filter(|i| *i < rules.len()) {
                Some(i) => {
                    rules.remove(i);
                    ok(true)
                }
                None => ok(false),
            }
        }
        "-F" if exists => {
            chains.entry(chain).or_default().clear();
            ok(true)
        }
        "-X" if exists => {
            let referenced = chains.values().flatten().any(|r| r.last() == Some(&chain));
            let empty = chains.get(&chain).is_some_and(Vec::is_empty);
            if referenced || !empty {
                ok(false)
            } else {
                chains.remove(&chain);
                ok(true)
            }
        }
        _ => ok(false),
    }
}
