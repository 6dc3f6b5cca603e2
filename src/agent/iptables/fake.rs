//! A [`Runner`] that keeps a `nat` table in memory and records every command, for unit tests
//! of the rule logic without root. It understands the commands the logic uses (`-S`, `-N`,
//! `-C`, `-I`, `-A`, `-D` by rule or number, `-F`, `-X`) with iptables' exit semantics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{IptablesError, Outcome, Runner};

/// The shared table; clones see the same state.
#[derive(Clone, Default)]
pub struct FakeIptables {
    state: Arc<Mutex<State>>,
}

struct State {
    chains: BTreeMap<String, Vec<Vec<String>>>,
    log: Vec<Vec<String>>,
    fail: bool,
}

impl Default for State {
    fn default() -> State {
        let chains =
            BTreeMap::from([("PREROUTING".to_string(), Vec::new()), ("OUTPUT".to_string(), Vec::new())]);
        State { chains, log: Vec::new(), fail: false }
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

    /// Puts a rule at the end of `chain`, creating the chain, as another program would.
    pub fn append(&self, chain: &str, rule: &[&str]) {
        let rule = rule.iter().map(|s| s.to_string()).collect();
        self.state().chains.entry(chain.to_string()).or_default().push(rule);
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
    async fn run(&self, args: &[String]) -> Result<Outcome, IptablesError> {
        let mut state = self.state();
        state.log.push(args.to_vec());
        if state.fail {
            return Err(IptablesError::Spawn {
                program: "iptables".into(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let (op, chain, rest) = match args {
            [op, chain, rest @ ..] => (op.as_str(), chain.clone(), rest.to_vec()),
            _ => return Ok(ok(false)),
        };
        let exists = state.chains.contains_key(&chain);
        let outcome = match op {
            "-S" => match state.chains.get(&chain) {
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
                state.chains.insert(chain, Vec::new());
                ok(true)
            }
            "-C" => ok(state.chains.get(&chain).is_some_and(|rules| rules.contains(&rest))),
            "-I" | "-A" if exists => {
                let rules = state.chains.entry(chain).or_default();
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
                let rules = state.chains.entry(chain).or_default();
                let index = match rest.as_slice() {
                    [n] if n.parse::<usize>().is_ok() => {
                        n.parse::<usize>().ok().and_then(|n| n.checked_sub(1))
                    }
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
                state.chains.entry(chain).or_default().clear();
                ok(true)
            }
            "-X" if exists => {
                let referenced = state.chains.values().flatten().any(|r| r.last() == Some(&chain));
                let empty = state.chains.get(&chain).is_some_and(Vec::is_empty);
                if referenced || !empty {
                    ok(false)
                } else {
                    state.chains.remove(&chain);
                    ok(true)
                }
            }
            _ => ok(false),
        };
        Ok(outcome)
    }
}
