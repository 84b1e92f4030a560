//! The plan's warnings and refusals: forward methods, DR port rewrites,
//! addresses outside every pool, and what a refused request means.

use super::*;

/// A Service annotated with the forward method `value`.
fn mk_method(value: &str) -> Service {
    mk_service("web")
        .annotation(FORWARD_METHOD_ANNOTATION, value)
        .build()
}

/// The notes of a first answer of 10.0.0.1 from `pool`.
fn given_notes(p: &Apply, pool: &str) -> Notes {
    match p.outcome(Ok(&mk_allocated("10.0.0.1", pool)), None) {
        Outcome::Publish { notes, .. } => notes,
        other => panic!("expected Publish, got {other:?}"),
    }
}

/// The ConfigMap entry a first answer from the default pool gives.
fn entry_of(p: &Apply) -> String {
    match p.outcome(Ok(&mk_allocated("10.0.0.1", "default")), None) {
        Outcome::Publish { entry, .. } => entry.value(),
        other => panic!("expected Publish, got {other:?}"),
    }
}

#[test]
fn proxy_without_the_proxy_protocol_mode_warns_and_the_entry_has_the_default_method() {
    let svc = mk_method("PROXY");
    let note = the_warning(&mk_apply(&svc).notes.publish, reason::INVALID_ANNOTATION).clone();
    for word in [
        FORWARD_METHOD_ANNOTATION,
        "\"PROXY\"",
        "proxy-protocol mode",
        desired::PROXY_PROTOCOL_SETTING,
    ] {
        assert!(
            note.message.contains(word),
            "{word:?} not in {}",
            note.message
        );
    }
    assert_eq!(entry_of(&mk_apply(&svc)), "shop/web");
    let nat = Settings {
        default_forward_method: Some(ForwardMethod::Nat),
        ..mk_settings()
    };
    assert_eq!(
        entry_of(&mk_apply_in(&svc, &nat, &Adoptable::default())),
        "shop/web:NAT"
    );
}

#[test]
fn proxy_with_the_proxy_protocol_mode_is_written_without_a_warning() {
    let svc = mk_method("proxy");
    let mode = Settings {
        proxy_protocol_mode: true,
        ..mk_settings()
    };
    let p = mk_apply_in(&svc, &mode, &Adoptable::default());
    assert!(p.notes.publish.is_empty(), "{:?}", p.notes.publish);
    assert_eq!(entry_of(&p), "shop/web:PROXY");
}

#[test]
fn dr_with_a_port_rewrite_warns_naming_each_pair_and_still_gets_its_address_and_entry() {
    let svc = mk_service("web")
        .annotation(FORWARD_METHOD_ANNOTATION, "DR")
        .port(80, 8080)
        .port(443, 443)
        .port(25, 2525)
        .build();
    let p = mk_apply(&svc);
    assert!(p.notes.publish.is_empty(), "{:?}", p.notes.publish);
    let notes = given_notes(&p, "default");
    let note = the_warning(&notes.publish, reason::PORT_REWRITE);
    for word in [
        "port 80 with targetPort 8080",
        "port 25 with targetPort 2525",
        "DR",
        "rewrite",
        "virtual port",
    ] {
        assert!(
            note.message.contains(word),
            "{word:?} not in {}",
            note.message
        );
    }
    assert!(!note.message.contains("443"), "{}", note.message);
    assert!(!notes.clear.contains(&reason::PORT_REWRITE));
    assert_eq!(entry_of(&p), "shop/web:DR");
}

#[test]
fn equal_ports_or_another_method_forget_an_earlier_port_rewrite_warning() {
    for svc in [
        mk_service("web")
            .annotation(FORWARD_METHOD_ANNOTATION, "DR")
            .port(80, 80)
            .build(),
        mk_service("web")
            .annotation(FORWARD_METHOD_ANNOTATION, "NAT")
            .port(80, 8080)
            .build(),
    ] {
        let notes = given_notes(&mk_apply(&svc), "default");
        assert!(notes.publish.is_empty(), "{:?}", notes.publish);
        assert!(notes.clear.contains(&reason::PORT_REWRITE));
    }
}

#[test]
fn an_address_outside_every_pool_is_kept_with_one_warning_naming_it() {
    // Adopted from the status: kept, not announced again, warned about.
    let svc = mk_service("web").finalized().status("192.0.2.7").build();
    let p = mk_apply(&svc);
    assert_eq!(p.ask, keep("192.0.2.7"));
    assert!(!p.release_first);
    let outcome = p.outcome(Ok(&mk_allocated("192.0.2.7", "")), Some(&mk_key("web")));
    let Outcome::Publish {
        ip,
        entry,
        announce,
        notes,
    } = outcome
    else {
        panic!("expected Publish, got {outcome:?}");
    };
    assert_eq!(ip, mk_ip("192.0.2.7"));
    assert_eq!(entry.value(), "shop/web");
    assert_eq!(announce, None);
    let note = the_warning(&notes.publish, reason::OUTSIDE_POOLS);
    assert!(note.message.starts_with("192.0.2.7 "), "{}", note.message);
    assert!(!notes.clear.contains(&reason::OUTSIDE_POOLS));
}

#[test]
fn an_address_in_a_pool_forgets_an_earlier_outside_pools_warning() {
    let notes = given_notes(&mk_apply(&mk_service("web").build()), "default");
    assert_eq!(
        notes,
        Notes {
            clear: vec![reason::PORT_REWRITE, reason::OUTSIDE_POOLS],
            publish: vec![]
        }
    );
}

/// What the plan does when the allocator answers with `error`.
fn mk_failed(p: &Apply, error: &AllocError) -> Failure {
    match p.outcome(Err(error), None) {
        Outcome::Failed(f) => f,
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[test]
fn a_denied_or_invalid_request_is_a_refusal_of_the_service_with_the_allocators_reason() {
    let p = mk_apply(&mk_service("web").annotation(POOL_ANNOTATION, "dmz").build());
    for refused in [
        AllocError::Denied("pool \"dmz\" admits only owners service:team-a/".into()),
        AllocError::Invalid("address 127.0.0.1 is special-purpose".into()),
        AllocError::Refused("FAILED_PRECONDITION: 10.0.0.0 is the network address".into()),
    ] {
        let f = mk_failed(&p, &refused);
        assert!(
            !f.adopt_again && !f.wait_for_release,
            "not the allocator being down: {refused}"
        );
        assert_eq!(
            (f.note.type_, f.note.reason),
            (EventType::Warning, reason::ALLOCATION_FAILED)
        );
        assert_eq!(f.note.message, refused.to_string());
        assert_eq!(f.error, refused);
    }
}

#[test]
fn a_refused_move_claims_back_the_address_held_before_and_a_refused_new_request_claims_nothing() {
    let mover = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .annotation(ADDRESS_ANNOTATION, "10.0.0.9")
        .build();
    let moving = mk_apply(&mover);
    let fresh = mk_apply(
        &mk_service("web")
            .annotation(ADDRESS_ANNOTATION, "10.0.0.9")
            .build(),
    );
    for refused in [
        AllocError::Held("10.0.0.9 is held by shop/db".into()),
        AllocError::Denied("address 10.0.0.9 is not for owner service:shop/web".into()),
        AllocError::Exhausted("pool \"dmz\" has no free address".into()),
    ] {
        let reclaims = |p| mk_failed(p, &refused).reclaim;
        assert_eq!(reclaims(&moving), Some(mk_ip("10.0.0.1")), "{refused}");
        assert_eq!(reclaims(&fresh), None, "{refused}");
    }
    // An unreachable allocator is not asked again: adoption claims it back.
    let down = AllocError::Unreachable("connection refused".into());
    let f = mk_failed(&moving, &down);
    assert_eq!(f.reclaim, None);
    assert!(f.adopt_again);
}
