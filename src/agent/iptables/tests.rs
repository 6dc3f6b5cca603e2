//! The rule logic against the in-memory fake.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::fake::FakeIptables;
use super::*;

use super::rules::test_config as config;

fn mutating(log: &[Vec<String>]) -> Vec<String> {
    log.iter().filter(|c| !matches!(c[0].as_str(), "-S" | "-C")).map(|c| c.join(" ")).collect()
}

#[tokio::test]
async fn install_adds_a_chain_a_rule_and_a_jump_once() {
    let fake = FakeIptables::default();
    fake.append("PREROUTING", &["-j", "KUBE-SERVICES"]);
    let rules = Interception::new(fake.clone(), config("cali+"));
    assert!(!rules.is_installed().await.expect("check"));
    assert!(rules.install().await.expect("install"), "a fresh table changes");
    assert_eq!(fake.chain(DEFAULT_CHAIN), Some(vec![rules.rules().dnat.clone()]));
    let prerouting = fake.chain("PREROUTING").expect("PREROUTING");
    assert_eq!(prerouting[0], rules.rules().jump, "the jump goes first, ahead of kube-proxy");
    assert_eq!(prerouting.len(), 2);
    assert!(rules.is_installed().await.expect("check"));

    fake.clear_log();
    assert!(!rules.install().await.expect("install again"), "a second install changes nothing");
    assert_eq!(mutating(&fake.log()), Vec::<String>::new());
    assert_eq!(fake.chain("PREROUTING").map(|r| r.len()), Some(2));
}

#[tokio::test]
async fn a_chain_left_by_another_configuration_is_replaced_without_a_gap() {
    let fake = FakeIptables::default();
    let old = Interception::new(fake.clone(), config("docker0"));
    old.install().await.expect("old install");
    fake.append(DEFAULT_CHAIN, &["-j", "RETURN"]);

    let new = Interception::new(fake.clone(), config("!eth0"));
    fake.clear_log();
    assert!(new.install().await.expect("install"));
    assert_eq!(fake.chain(DEFAULT_CHAIN), Some(vec![new.rules().dnat.clone()]));
    assert_eq!(
        mutating(&fake.log()),
        vec![
            format!("-I {DEFAULT_CHAIN} 1 {}", new.rules().dnat.join(" ")),
            format!("-D {DEFAULT_CHAIN} 2"),
            format!("-D {DEFAULT_CHAIN} 2"),
        ],
        "ours first, then the stale rules; the jump (same for both) stays"
    );
    assert!(new.is_installed().await.expect("check"));
}

#[tokio::test]
async fn remove_deletes_only_our_rules() {
    let fake = FakeIptables::default();
    fake.append("PREROUTING", &["-j", "KUBE-SERVICES"]);
    let rules = Interception::new(fake.clone(), config("cali+"));
    rules.install().await.expect("install");
    rules.remove_with_retries().await.expect("remove");
    assert_eq!(fake.chain(DEFAULT_CHAIN), None);
    assert_eq!(fake.chain("PREROUTING"), Some(vec![vec!["-j".to_string(), "KUBE-SERVICES".to_string()]]));
    rules.remove().await.expect("removing twice is fine");
}

#[tokio::test]
async fn failures_are_errors() {
    let fake = FakeIptables::default();
    fake.set_failing(true);
    let rules = Interception::new(fake.clone(), config("cali+"));
    assert!(matches!(rules.install().await, Err(IptablesError::Spawn { .. })));
    assert!(rules.is_installed().await.is_err());
}

#[tokio::test(start_paused = true)]
async fn the_check_loop_restores_deleted_rules_and_counts_them() {
    let fake = FakeIptables::default();
    let rules = Arc::new(Interception::new(fake.clone(), config("cali+")));
    rules.install().await.expect("install");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(Arc::clone(&rules).keep_installed(shutdown.clone()));

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(rules.restorations(), 0, "nothing to restore while the rules are in place");

    fake.delete("PREROUTING", &rules.rules().jump);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(rules.is_installed().await.expect("check"));
    assert_eq!(rules.restorations(), 1);

    fake.delete(DEFAULT_CHAIN, &rules.rules().dnat);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(rules.is_installed().await.expect("check"));
    assert_eq!(rules.restorations(), 2);

    // A failing check is logged and tried again; it does not end the loop.
    fake.set_failing(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    fake.set_failing(false);
    fake.delete("PREROUTING", &rules.rules().jump);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rules.restorations(), 3);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(1), task).await.expect("stops on shutdown").expect("no panic");
}

#[tokio::test]
async fn the_jump_is_kept_first_in_prerouting() {
    let fake = FakeIptables::default();
    let rules = Interception::new(fake.clone(), config("cali+"));
    rules.install().await.expect("install");
    // Docker or kube-proxy puts a rule of its own on top, and a stale copy of ours sits below.
    fake.insert_first("PREROUTING", &["-j", "DOCKER"]);
    let jump: Vec<&str> = rules.rules().jump.iter().map(String::as_str).collect();
    fake.append("PREROUTING", &jump);
    assert!(!rules.is_installed().await.expect("check"), "present is not enough: it must be first");
    assert!(rules.install().await.expect("install"), "moving the jump is a change");
    let prerouting = fake.chain("PREROUTING").expect("PREROUTING");
    assert_eq!(prerouting[0], rules.rules().jump);
    assert_eq!(prerouting.iter().filter(|r| **r == rules.rules().jump).count(), 1, "{prerouting:?}");
    assert!(prerouting.contains(&vec!["-j".to_string(), "DOCKER".to_string()]), "theirs stays");
    assert!(rules.is_installed().await.expect("check"));
}

#[tokio::test]
async fn tracked_flows_to_the_metadata_address_are_flushed_after_each_change() {
    let fake = FakeIptables::default();
    let rules = Interception::new(fake.clone(), config("cali+"));
    rules.install().await.expect("install");
    assert_eq!(fake.conntrack(), vec![rules.rules().flush()]);
    rules.install().await.expect("no change");
    assert_eq!(fake.conntrack().len(), 1, "nothing changed, nothing flushed");
    fake.delete("PREROUTING", &rules.rules().jump);
    rules.install().await.expect("restored");
    assert_eq!(fake.conntrack().len(), 2, "a restoration flushes again");
}

#[tokio::test]
async fn with_an_ipv6_target_the_ipv6_endpoint_is_intercepted_too() {
    let fake = FakeIptables::default();
    let dual = Config { target6: Some("[fd00:1::5]:8181".parse().expect("v6")), ..config("cali+") };
    let rules = Interception::new(fake.clone(), dual);
    rules.install().await.expect("install");
    let six = rules.rules6().expect("IPv6 rules").clone();
    assert_eq!(fake.chain6(DEFAULT_CHAIN), Some(vec![six.dnat.clone()]));
    assert_eq!(fake.chain6("PREROUTING").expect("PREROUTING")[0], six.jump);
    assert_eq!(fake.chain(DEFAULT_CHAIN), Some(vec![rules.rules().dnat.clone()]), "IPv4 as before");
    assert_eq!(fake.conntrack(), vec![rules.rules().flush(), six.flush()]);
    assert!(rules.is_installed().await.expect("check"));
    rules.remove().await.expect("remove");
    assert_eq!((fake.chain(DEFAULT_CHAIN), fake.chain6(DEFAULT_CHAIN)), (None, None));
}

#[tokio::test]
async fn the_container_endpoint_has_a_chain_of_its_own_jumped_to_first_from_prerouting_and_output() {
    let fake = FakeIptables::default();
    let rules = Interception::new(fake.clone(), Config { container: true, ..config("cali+") });
    assert!(rules.install().await.expect("install"));
    let ct = rules.container_rules().expect("container rules").clone();
    assert_eq!(
        ct.dnat.join(" "),
        "-p tcp -d 169.254.170.23/32 --dport 80 -j DNAT --to-destination 10.0.0.5:8181"
    );
    assert_eq!(fake.chain(&ct.chain), Some(vec![ct.dnat.clone()]));
    assert_eq!(fake.chain("OUTPUT").expect("OUTPUT")[0], ct.jump);
    let prerouting = fake.chain("PREROUTING").expect("PREROUTING");
    assert_eq!(prerouting.len(), 2, "both jumps, on top: {prerouting:?}");
    assert!(prerouting.contains(&ct.jump) && prerouting.contains(&rules.rules().jump));
    assert!(rules.is_installed().await.expect("check"));
    assert!(!rules.install().await.expect("again"), "a second install changes nothing");
    rules.remove().await.expect("remove");
    assert_eq!((fake.chain(&ct.chain), fake.chain(DEFAULT_CHAIN)), (None, None));
    assert_eq!(fake.chain("OUTPUT"), Some(vec![]));
}

#[tokio::test]
async fn with_an_ipv6_address_the_container_endpoints_ipv6_address_is_intercepted_too() {
    let fake = FakeIptables::default();
    let target6 = Some("[fd00:1::5]:8181".parse().expect("v6"));
    let rules = Interception::new(fake.clone(), Config { container: true, target6, ..config("cali+") });
    rules.install().await.expect("install");
    let ct6 = rules.container_rules6().expect("IPv6 container rules").clone();
    assert_eq!(
        ct6.dnat.join(" "),
        "-p tcp -d fd00:ec2::23/128 --dport 80 -j DNAT --to-destination [fd00:1::5]:8181"
    );
    assert_eq!(fake.chain6(&ct6.chain), Some(vec![ct6.dnat.clone()]));
    assert!(fake.chain6("OUTPUT").expect("OUTPUT").contains(&ct6.jump));
    assert!(rules.is_installed().await.expect("check"));
    assert!(!rules.install().await.expect("again"), "stable");
    rules.remove().await.expect("remove");
    assert_eq!(fake.chain6(&ct6.chain), None);
}

#[tokio::test]
async fn the_connection_limit_is_a_filter_chain_of_its_own_jumped_to_first_from_input() {
    let fake = FakeIptables::default();
    fake.append("PREROUTING", &["-j", "KUBE-SERVICES"]);
    let without = Interception::new(fake.clone(), config("cali+"));
    without.install().await.expect("install");
    assert_eq!(fake.filter_chain("INPUT"), Some(vec![]), "off by default: filter untouched");

    let rules = Interception::new(fake.clone(), Config { connlimit: Some(8), ..config("cali+") });
    assert!(!rules.is_installed().await.expect("check"), "the limit is missing");
    assert!(rules.install().await.expect("install"));
    let limit = rules.limit_rules().expect("limit rules").clone();
    assert_eq!(fake.filter_chain(&limit.chain), Some(vec![limit.dnat.clone()]));
    assert_eq!(fake.filter_chain("INPUT").expect("INPUT"), vec![limit.jump.clone()]);
    assert_eq!(fake.chain(&limit.chain), None, "nothing of it in nat");
    let flush = rules.rules().flush();
    assert!(
        fake.conntrack().iter().all(|c| *c == flush),
        "no flush of the limit's own: {:?}",
        fake.conntrack()
    );
    assert!(rules.is_installed().await.expect("check"));
    fake.clear_log();
    assert!(!rules.install().await.expect("again"), "stable");
    rules.remove().await.expect("remove");
    assert_eq!(fake.filter_chain(&limit.chain), None);
    assert_eq!(fake.filter_chain("INPUT"), Some(vec![]));
}
