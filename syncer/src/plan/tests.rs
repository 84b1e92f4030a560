//! One test per case the end-to-end tests cover, on the plan alone.

use super::*;
use crate::{
    desired::{ADDRESS_ANNOTATION, FORWARD_METHOD_ANNOTATION, POOL_ANNOTATION},
    fixtures::{mk_ip, mk_legacy, mk_service},
};

fn mk_settings() -> Settings {
    Settings::default()
}

fn mk_apply(svc: &Service) -> Apply {
    mk_apply_with(svc, &Adoptable::default())
}

fn mk_apply_with(svc: &Service, adoptable: &Adoptable) -> Apply {
    mk_apply_in(svc, &mk_settings(), adoptable)
}

fn mk_apply_in(svc: &Service, settings: &Settings, adoptable: &Adoptable) -> Apply {
    match plan(svc, settings, adoptable) {
        Plan::Apply(a) => a,
        other => panic!("expected Apply, got {other:?}"),
    }
}

fn mk_cleanup(svc: &Service, settings: &Settings) -> Cleanup {
    match plan(svc, settings, &Adoptable::default()) {
        Plan::Cleanup(c) => c,
        other => panic!("expected Cleanup, got {other:?}"),
    }
}

/// The Events of a Service with the annotation, which is refused.
fn mk_refused(key: &str, value: &str) -> Notes {
    let svc = mk_service("web").annotation(key, value).build();
    match plan(&svc, &mk_settings(), &Adoptable::default()) {
        Plan::Refuse(n) => n,
        other => panic!("expected Refuse, got {other:?}"),
    }
}

fn mk_allocated(ip: &str, pool: &str) -> Allocated {
    Allocated {
        ip: mk_ip(ip),
        pool: pool.into(),
    }
}

fn mk_key(name: &str) -> ServiceKey {
    ("shop".into(), name.into())
}

fn ask(address: Option<&str>, pool: Option<&str>) -> Request {
    Request {
        address: address.map(mk_ip),
        pool: pool.map(Into::into),
        adopt: false,
    }
}

fn keep(address: &str) -> Request {
    Request::keep(mk_ip(address))
}

fn announced(outcome: &Outcome) -> Option<&Note> {
    match outcome {
        Outcome::Publish { announce, .. } => announce.as_ref(),
        other => panic!("expected Publish, got {other:?}"),
    }
}

/// The one Event, a Warning of `reason`.
fn the_warning<'a>(published: &'a [Note], reason: &str) -> &'a Note {
    assert_eq!(published.len(), 1, "{published:?}");
    let note = &published[0];
    assert_eq!((note.type_, note.reason), (EventType::Warning, reason));
    note
}

/// The Event announcing a first answer of `ip` from `pool`.
fn announcement(p: &Apply, ip: &str, pool: &str) -> String {
    let outcome = p.outcome(Ok(&mk_allocated(ip, pool)), None);
    announced(&outcome).expect("an Event").message.clone()
}

#[test]
fn a_new_service_gets_the_finalizer_adoption_first_and_any_address_of_the_default_pool() {
    let p = mk_apply(&mk_service("web").build());
    assert!(p.add_finalizer);
    assert!(p.adopt_first, "a new address only after adoption");
    assert!(!p.release_first);
    assert_eq!(p.ask, ask(None, None));
    assert_eq!(p.status, None);
    assert_eq!(
        p.notes,
        Notes {
            clear: vec![reason::INVALID_ANNOTATION],
            publish: vec![]
        }
    );
}

#[test]
fn a_new_address_is_recorded_written_to_the_status_and_announced_with_its_pool() {
    let p = mk_apply(&mk_service("web").build());
    let outcome = p.outcome(Ok(&mk_allocated("10.0.0.1", "default")), None);
    let Outcome::Publish { ip, entry, .. } = &outcome else {
        panic!("expected Publish, got {outcome:?}");
    };
    assert_eq!(*ip, mk_ip("10.0.0.1"));
    assert_eq!(entry.value(), "shop/web");
    let note = announced(&outcome).expect("an Event");
    assert_eq!(note.type_, EventType::Normal);
    assert_eq!(note.reason, reason::ALLOCATED);
    assert_eq!(note.message, "allocated 10.0.0.1 from pool default");
    assert_eq!(
        announcement(&p, "192.0.2.7", ""),
        "allocated 192.0.2.7 outside every pool"
    );
}

#[test]
fn a_service_with_its_address_in_status_keeps_it_and_writes_nothing() {
    let svc = mk_service("web").finalized().status("10.0.0.1").build();
    let p = mk_apply(&svc);
    assert!(!p.add_finalizer);
    assert!(!p.adopt_first && !p.release_first);
    assert_eq!(p.ask, keep("10.0.0.1"), "what is in use is adopted");
    let outcome = p.outcome(
        Ok(&mk_allocated("10.0.0.1", "default")),
        Some(&mk_key("web")),
    );
    assert_eq!(announced(&outcome), None, "no status write, no Event");
}

#[test]
fn the_forward_method_goes_into_the_entry() {
    let svc = mk_service("web")
        .annotation(FORWARD_METHOD_ANNOTATION, "dr")
        .build();
    let outcome = mk_apply(&svc).outcome(Ok(&mk_allocated("10.0.0.1", "default")), None);
    let Outcome::Publish { entry, .. } = outcome else {
        panic!("expected Publish");
    };
    assert_eq!(entry.value(), "shop/web:DR");
}

#[test]
fn a_requested_address_is_asked_for_without_adopting_first() {
    for svc in [
        mk_service("web")
            .annotation(ADDRESS_ANNOTATION, "10.0.0.7")
            .build(),
        mk_service("web").load_balancer_ip("10.0.0.7").build(),
    ] {
        let p = mk_apply(&svc);
        assert_eq!(p.ask, ask(Some("10.0.0.7"), None));
        assert!(!p.adopt_first && !p.release_first);
    }
}

#[test]
fn a_requested_pool_is_asked_for() {
    let svc = mk_service("web").annotation(POOL_ANNOTATION, "dmz").build();
    let p = mk_apply(&svc);
    assert_eq!(p.ask, ask(None, Some("dmz")));
    assert!(p.adopt_first);
}

#[test]
fn a_requested_address_other_than_the_status_is_a_move_and_an_equal_one_is_kept() {
    for (want, moves) in [("10.0.0.9", true), ("10.0.0.1", false)] {
        let svc = mk_service("web")
            .finalized()
            .status("10.0.0.1")
            .annotation(ADDRESS_ANNOTATION, want)
            .build();
        let p = mk_apply(&svc);
        assert_eq!(p.release_first, moves, "{want}");
        let asked = if moves {
            ask(Some(want), None)
        } else {
            keep(want)
        };
        assert_eq!(p.ask, asked, "{want}");
    }
}

#[test]
fn a_moved_service_announces_its_new_address() {
    let svc = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .annotation(ADDRESS_ANNOTATION, "10.0.0.9")
        .build();
    assert_eq!(
        announcement(&mk_apply(&svc), "10.0.0.9", "default"),
        "allocated 10.0.0.9 from pool default"
    );
}

#[test]
fn a_deleted_service_with_the_finalizer_is_cleaned_up_and_its_events_forgotten() {
    let svc = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .deleting()
        .build();
    let c = mk_cleanup(&svc, &mk_settings());
    assert!(c.managed && c.deleting);
    assert!(!c.clear_status, "a deleted Service's status is not written");
    assert!(c.served(None, false, false));
    let note = c.released(Some(mk_ip("10.0.0.1"))).expect("an Event");
    assert_eq!(note.reason, reason::RELEASED);
    assert_eq!(note.message, "released 10.0.0.1");
    assert_eq!(c.released(None), None);
}

#[test]
fn a_deleted_service_without_the_finalizer_is_left_alone() {
    let svc = mk_service("web").deleting().build();
    assert_eq!(
        plan(&svc, &mk_settings(), &Adoptable::default()),
        Plan::Ignore
    );
}

#[test]
fn a_service_no_longer_a_load_balancer_clears_its_status_only_if_this_syncer_served_it() {
    let svc = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .type_("ClusterIP")
        .build();
    let c = mk_cleanup(&svc, &mk_settings());
    assert!(!c.managed && !c.deleting);
    assert!(c.clear_status);
    assert!(
        !c.served(None, false, false),
        "another may hold the finalizer"
    );
    assert!(c.served(Some(mk_ip("10.0.0.1")), false, false));
    assert!(c.served(None, true, false));
    assert!(c.served(None, false, true));
}

#[test]
fn a_former_load_balancer_with_an_address_from_before_vipam_was_served() {
    let svc = mk_service("web").finalized().type_("ClusterIP").build();
    let adoptable = Adoptable::new([mk_legacy("uid-web", "10.0.0.3")]);
    let Plan::Cleanup(c) = plan(&svc, &mk_settings(), &adoptable) else {
        panic!("expected Cleanup");
    };
    assert!(c.served(None, false, false));
}

#[test]
fn services_of_another_class_are_never_touched() {
    let with_class = Settings {
        load_balancer_class: Some("vipam.io/keepalived".into()),
        ..Default::default()
    };
    let foreign = [
        (
            mk_service("a").class("other").finalized().build(),
            mk_settings(),
        ),
        (
            mk_service("b").class("other").finalized().build(),
            with_class.clone(),
        ),
        (
            mk_service("c").finalized().status("10.0.0.1").build(),
            with_class.clone(),
        ),
        (
            mk_service("d")
                .class("other")
                .finalized()
                .deleting()
                .build(),
            mk_settings(),
        ),
        (
            mk_service("e")
                .class("other")
                .type_("ClusterIP")
                .finalized()
                .build(),
            with_class.clone(),
        ),
    ];
    for (svc, settings) in foreign {
        assert_eq!(
            plan(&svc, &settings, &Adoptable::default()),
            Plan::Ignore,
            "{:?}",
            svc.metadata.name
        );
    }
    let ours = mk_service("f").class("vipam.io/keepalived").build();
    assert!(matches!(
        plan(&ours, &with_class, &Adoptable::default()),
        Plan::Apply(_)
    ));
}

#[test]
fn a_requested_ipv6_address_is_refused_with_an_event_and_nothing_else() {
    let notes = mk_refused(ADDRESS_ANNOTATION, "2001:db8::1");
    let note = the_warning(&notes.publish, reason::IPV6_NOT_SUPPORTED);
    assert!(note.message.contains("2001:db8::1"), "{}", note.message);
}

#[test]
fn an_ipv6_address_from_a_pool_is_released_with_an_event_naming_the_pool() {
    let p = mk_apply(&mk_service("web").annotation(POOL_ANNOTATION, "v6").build());
    let outcome = p.outcome(Ok(&mk_allocated("2001:db8::2", "v6")), None);
    let Outcome::Ipv6 { note } = outcome else {
        panic!("expected Ipv6, got {outcome:?}");
    };
    assert_eq!(note.reason, reason::IPV6_NOT_SUPPORTED);
    assert!(
        note.message.starts_with("2001:db8::2 from pool v6 is IPv6"),
        "{}",
        note.message
    );
}

#[test]
fn an_invalid_address_annotation_is_refused_with_an_event_naming_the_value() {
    let notes = mk_refused(ADDRESS_ANNOTATION, "10.0.0.300");
    assert!(notes.clear.is_empty());
    let note = the_warning(&notes.publish, reason::INVALID_ANNOTATION);
    assert!(note.message.contains("\"10.0.0.300\""), "{}", note.message);
}

#[test]
fn an_invalid_forward_method_warns_and_still_allocates() {
    let svc = mk_service("web")
        .annotation(FORWARD_METHOD_ANNOTATION, "TUN")
        .build();
    let p = mk_apply(&svc);
    assert!(p.notes.clear.is_empty(), "the warning stays published");
    let note = the_warning(&p.notes.publish, reason::INVALID_ANNOTATION);
    assert!(note.message.contains("\"TUN\""), "{}", note.message);
}

#[test]
fn a_service_without_status_keeps_its_address_from_before_vipam() {
    let adoptable = Adoptable::new([mk_legacy("uid-web", "10.0.0.3")]);
    let p = mk_apply_with(&mk_service("web").build(), &adoptable);
    assert_eq!(p.ask, keep("10.0.0.3"));
    assert!(!p.adopt_first);
    assert_eq!(
        announcement(&p, "10.0.0.3", "default"),
        "adopted 10.0.0.3 from pool default"
    );
}

#[test]
fn the_status_wins_over_an_address_from_before_vipam() {
    let adoptable = Adoptable::new([mk_legacy("uid-web", "10.0.0.3")]);
    let svc = mk_service("web").finalized().status("10.0.0.1").build();
    let p = mk_apply_with(&svc, &adoptable);
    assert_eq!(p.ask, keep("10.0.0.1"));
    assert_eq!(p.adopted, None);
}

#[test]
fn an_address_another_service_holds_is_stale() {
    let p = mk_apply(&mk_service("web").build());
    let outcome = p.outcome(
        Ok(&mk_allocated("10.0.0.1", "default")),
        Some(&mk_key("db")),
    );
    assert_eq!(
        outcome,
        Outcome::Stale {
            ip: mk_ip("10.0.0.1"),
            holder: mk_key("db")
        }
    );
}

#[test]
fn a_full_pool_waits_for_a_release_an_unreachable_allocator_requires_adoption_and_a_refusal_is_reported()
 {
    let p = mk_apply(&mk_service("web").build());
    let full = AllocError::Exhausted("pool \"default\" has no free address".into());
    let Outcome::Failed(f) = p.outcome(Err(&full), None) else {
        panic!("expected Failed");
    };
    assert!(f.wait_for_release && !f.adopt_again);
    assert_eq!(f.note.reason, reason::ALLOCATION_FAILED);
    assert_eq!(f.note.message, full.to_string());
    assert_eq!(f.error, full);
    let down = AllocError::Unreachable("connection refused".into());
    let Outcome::Failed(f) = p.outcome(Err(&down), None) else {
        panic!("expected Failed");
    };
    assert!(f.adopt_again && !f.wait_for_release);
    for refused in [
        AllocError::Held("10.0.0.7 is held by shop/db".into()),
        AllocError::UnknownPool("no pool \"dmz\"".into()),
    ] {
        let Outcome::Failed(f) = p.outcome(Err(&refused), None) else {
            panic!("expected Failed");
        };
        assert!(!f.adopt_again && !f.wait_for_release, "{refused}");
        assert_eq!(f.note.reason, reason::ALLOCATION_FAILED);
        assert_eq!(f.note.message, refused.to_string());
    }
}

/// The forward-method, port-rewrite, outside-pools and refusal rules.
mod warnings;
