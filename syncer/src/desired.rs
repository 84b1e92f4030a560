//! What a Service asks of vipam, as a pure function of the Service and the
//! syncer's settings: whether it is managed, which address or pool it asks
//! for, its keepalived forward method (`PROXY` only in proxy-protocol mode)
//! and the ports DR would rewrite, and what is wrong with its annotations.

use std::{fmt, net::IpAddr, str::FromStr};

use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::util::intstr::IntOrString};
use kube::ResourceExt;

/// The forward-method annotation of keepalived-cloud-provider.
pub const FORWARD_METHOD_ANNOTATION: &str = "k8s.co/keepalived-forward-method";
/// The annotation naming the pool to allocate from.
pub const POOL_ANNOTATION: &str = "vipam.io/pool";
/// The annotation naming a requested address.
pub const ADDRESS_ANNOTATION: &str = "vipam.io/load-balancer-ips";
/// The finalizer held while a Service has an address.
pub const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
/// The syncer setting that declares kube-keepalived-vip's proxy-protocol
/// mode, as messages name it.
pub const PROXY_PROTOCOL_SETTING: &str = "--proxy-protocol-mode (VIPAM_PROXY_PROTOCOL_MODE)";

/// How kube-keepalived-vip forwards traffic to a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ForwardMethod {
    /// Masquerading.
    Nat,
    /// Direct routing.
    Dr,
    /// The haproxy-based proxy mode.
    Proxy,
}

impl fmt::Display for ForwardMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardMethod::Nat => "NAT",
            ForwardMethod::Dr => "DR",
            ForwardMethod::Proxy => "PROXY",
        })
    }
}

impl FromStr for ForwardMethod {
    type Err = String;

    /// Parses NAT, DR or PROXY, in any case, around white space.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "NAT" => Ok(ForwardMethod::Nat),
            "DR" => Ok(ForwardMethod::Dr),
            "PROXY" => Ok(ForwardMethod::Proxy),
            _ => Err(format!("{s:?} is not a forward method (NAT, DR or PROXY)")),
        }
    }
}

/// The syncer settings that decide what a Service gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// With a class, only Services of that `spec.loadBalancerClass`; without,
    /// only Services without a class.
    pub load_balancer_class: Option<String>,
    /// Forward method of Services without the annotation; `None` writes no
    /// suffix.
    pub default_forward_method: Option<ForwardMethod>,
    /// Whether kube-keepalived-vip runs with `--proxy-protocol-mode`, the
    /// only mode in which it understands `PROXY`.
    pub proxy_protocol_mode: bool,
}

/// Why PROXY is not written without the proxy-protocol mode.
fn proxy_needs_the_mode() -> String {
    format!(
        "PROXY needs kube-keepalived-vip's proxy-protocol mode (its --proxy-protocol-mode; without it keepalived rejects the method and uses NAT), declared to vipam-syncer with {PROXY_PROTOCOL_SETTING}, which is off"
    )
}

/// Refuses a default forward method the consumer cannot apply: `PROXY`
/// without the proxy-protocol mode.
pub fn check_default_method(
    default: Option<ForwardMethod>,
    proxy_protocol_mode: bool,
) -> Result<(), String> {
    match default {
        Some(ForwardMethod::Proxy) if !proxy_protocol_mode => Err(format!(
            "KEEPALIVED_DEFAULT_FORWARD_METHOD (--default-forward-method) \"PROXY\": {}; set {PROXY_PROTOCOL_SETTING} when kube-keepalived-vip runs in that mode, or choose NAT or DR",
            proxy_needs_the_mode()
        )),
        _ => Ok(()),
    }
}

/// An annotation or field with a value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The annotation or field.
    pub field: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong and what vipam does instead.
    pub why: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}: {}", self.field, self.value, self.why)
    }
}

/// What the Service asks the allocator for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// A specific address (annotation, else `spec.loadBalancerIP`).
    pub address: Option<IpAddr>,
    /// A pool by name; `None` means the allocator's default.
    pub pool: Option<String>,
    /// The address is already in use (in the Service's status, or from the
    /// Go provider): the allocator records it even outside every pool.
    pub adopt: bool,
    /// The Service moves from the address it holds to the one asked for:
    /// the allocator releases the held one in the same write.
    pub moving: bool,
}

impl Request {
    /// The request for an address the Service already has, wherever it
    /// lies.
    pub fn keep(ip: IpAddr) -> Self {
        Request {
            address: Some(ip),
            pool: None,
            adopt: true,
            moving: false,
        }
    }
}

/// Everything vipam derives from a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Whether vipam handles the Service at all.
    pub managed: bool,
    /// What to allocate; `Err` when an annotation that decides the address is
    /// invalid (then nothing is allocated, rather than a wrong address).
    pub request: Result<Request, Problem>,
    /// The forward method to write in the ConfigMap.
    pub forward_method: Option<ForwardMethod>,
    /// Problems that do not block allocation (an invalid forward method
    /// falls back to the default).
    pub warnings: Vec<Problem>,
    /// With the forward method DR, the ports whose target port differs.
    pub port_rewrites: Vec<PortRewrite>,
}

/// A Service port whose numeric `targetPort` differs from its `port`, which
/// keepalived rewrites to the virtual port in DR mode (DR cannot translate
/// ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRewrite {
    /// The port's name, if it has one.
    pub name: Option<String>,
    /// The Service port (the virtual port).
    pub port: i32,
    /// Its target port.
    pub target_port: i32,
}

impl fmt::Display for PortRewrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "port {}", self.port)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        write!(f, " with targetPort {}", self.target_port)
    }
}

/// The ports of the Service whose numeric `targetPort` differs from the
/// `port`. A named `targetPort` is left out: its number is known only from
/// the Endpoints, so it cannot be compared here.
pub fn port_rewrites(svc: &Service) -> Vec<PortRewrite> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| match p.target_port {
            Some(IntOrString::Int(target)) if target != p.port => Some(PortRewrite {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: p.port,
                target_port: target,
            }),
            _ => None,
        })
        .collect()
}

fn annotation<'a>(svc: &'a Service, key: &str) -> Option<&'a str> {
    svc.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Whether the Service is a LoadBalancer of the class this syncer serves.
pub fn is_managed(svc: &Service, settings: &Settings) -> bool {
    let Some(spec) = &svc.spec else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    spec.load_balancer_class.as_deref() == settings.load_balancer_class.as_deref()
}

/// Whether a Service this syncer does not manage may still be one it served,
/// and so may need its clean-up: it is no longer a LoadBalancer (the API
/// server drops the class together with the type) and names no other class.
/// A LoadBalancer this syncer does not manage, or a Service of another class,
/// belongs to another implementation, which may use the same finalizer:
/// it is never touched.
pub fn may_have_been_managed(svc: &Service, settings: &Settings) -> bool {
    let Some(spec) = &svc.spec else {
        return true;
    };
    spec.type_.as_deref() != Some("LoadBalancer")
        && spec
            .load_balancer_class
            .as_deref()
            .is_none_or(|c| Some(c) == settings.load_balancer_class.as_deref())
}

fn requested_address(svc: &Service) -> Result<Option<IpAddr>, Problem> {
    if let Some(value) = annotation(svc, ADDRESS_ANNOTATION) {
        let trimmed = value.trim();
        if trimmed.contains(',') {
            return Err(Problem {
                field: ADDRESS_ANNOTATION,
                value: value.to_string(),
                why: "only one address per Service is supported; nothing is allocated".to_string(),
            });
        }
        return trimmed.parse().map(Some).map_err(|_| Problem {
            field: ADDRESS_ANNOTATION,
            value: value.to_string(),
            why: "not an IP address; nothing is allocated".to_string(),
        });
    }
    match svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .map(str::trim)
    {
        None | Some("") => Ok(None),
        Some(value) => value.parse().map(Some).map_err(|_| Problem {
            field: "spec.loadBalancerIP",
            value: value.to_string(),
            why: "not an IP address; nothing is allocated".to_string(),
        }),
    }
}

fn requested_pool(svc: &Service) -> Result<Option<String>, Problem> {
    match annotation(svc, POOL_ANNOTATION).map(str::trim) {
        None | Some("") => Ok(None),
        Some(name) if vipam::names::is_pool_name(name) => Ok(Some(name.to_string())),
        Some(name) => Err(Problem {
            field: POOL_ANNOTATION,
            value: name.to_string(),
            why: format!(
                "not a pool name ({}); nothing is allocated",
                vipam::names::POOL_NAME_RULE
            ),
        }),
    }
}

/// The forward method of an annotation's value, if kube-keepalived-vip can
/// apply it with these settings.
fn usable_method(value: &str, settings: &Settings) -> Result<ForwardMethod, String> {
    match value.parse()? {
        ForwardMethod::Proxy if !settings.proxy_protocol_mode => Err(proxy_needs_the_mode()),
        method => Ok(method),
    }
}

/// What vipam derives from the Service.
pub fn desired(svc: &Service, settings: &Settings) -> Desired {
    let managed = is_managed(svc, settings);
    let request = requested_address(svc).and_then(|address| {
        Ok(Request {
            address,
            pool: requested_pool(svc)?,
            adopt: false,
            moving: false,
        })
    });
    let mut warnings = Vec::new();
    let fallback = || {
        settings
            .default_forward_method
            .map_or("no forward method".to_string(), |m| {
                format!("the default {m}")
            })
    };
    let forward_method = match annotation(svc, FORWARD_METHOD_ANNOTATION) {
        None => settings.default_forward_method,
        Some(value) => match usable_method(value, settings) {
            Ok(method) => Some(method),
            Err(why) => {
                warnings.push(Problem {
                    field: FORWARD_METHOD_ANNOTATION,
                    value: value.to_string(),
                    why: format!("{why}; using {}", fallback()),
                });
                settings.default_forward_method
            }
        },
    };
    let port_rewrites = match forward_method {
        Some(ForwardMethod::Dr) => port_rewrites(svc),
        _ => Vec::new(),
    };
    Desired {
        managed,
        request,
        forward_method,
        warnings,
        port_rewrites,
    }
}

/// A Service as the allocator (its owner and labels, see
/// [`Owners`](crate::owner::Owners)) and the index know it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Uid of the Service.
    pub uid: String,
}

impl Subject {
    /// The subject of a Service.
    pub fn of(svc: &Service) -> Self {
        Subject {
            namespace: svc.namespace().unwrap_or_default(),
            name: svc.name_any(),
            uid: svc.metadata.uid.clone().unwrap_or_default(),
        }
    }

    /// The Service's namespace and name, as the index keys it.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The first ingress IP of the Service's status, if it is an IP.
pub fn status_ip(svc: &Service) -> Option<IpAddr> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .ip
        .as_deref()?
        .parse()
        .ok()
}

/// Whether the Service carries the vipam finalizer.
pub fn has_finalizer(svc: &Service) -> bool {
    svc.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServicePort, ServiceSpec, ServiceStatus,
    };
    use std::collections::BTreeMap;

    fn mk_service(annotations: &[(&str, &str)]) -> Service {
        let mut svc = Service::default();
        svc.metadata.name = Some("web".into());
        svc.metadata.namespace = Some("shop".into());
        svc.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        svc.spec = Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ..Default::default()
        });
        svc
    }

    #[test]
    fn only_load_balancers_of_the_configured_class_are_managed() {
        let mut svc = mk_service(&[]);
        let none = Settings::default();
        let class = Settings {
            load_balancer_class: Some("vipam.io/keepalived".into()),
            ..Default::default()
        };
        assert!(is_managed(&svc, &none));
        assert!(!is_managed(&svc, &class));
        svc.spec.as_mut().expect("spec").load_balancer_class = Some("vipam.io/keepalived".into());
        assert!(!is_managed(&svc, &none));
        assert!(is_managed(&svc, &class));
        svc.spec.as_mut().expect("spec").load_balancer_class = Some("other".into());
        assert!(!is_managed(&svc, &class));
        svc.spec.as_mut().expect("spec").type_ = Some("ClusterIP".into());
        svc.spec.as_mut().expect("spec").load_balancer_class = None;
        assert!(!is_managed(&svc, &none));
    }

    #[test]
    fn only_former_load_balancers_of_no_other_class_may_need_a_clean_up() {
        let none = Settings::default();
        let class = Settings {
            load_balancer_class: Some("vipam.io/keepalived".into()),
            ..Default::default()
        };
        // Load balancers this syncer does not manage belong to others.
        let mut svc = mk_service(&[]);
        assert!(!may_have_been_managed(&svc, &class));
        svc.spec.as_mut().expect("spec").load_balancer_class = Some("other".into());
        assert!(!may_have_been_managed(&svc, &none));
        assert!(!may_have_been_managed(&svc, &class));
        // No longer a load balancer: maybe, unless it names another class.
        svc.spec.as_mut().expect("spec").type_ = Some("ClusterIP".into());
        assert!(!may_have_been_managed(&svc, &none));
        svc.spec.as_mut().expect("spec").load_balancer_class = None;
        assert!(may_have_been_managed(&svc, &none));
        assert!(may_have_been_managed(&svc, &class));
        svc.spec.as_mut().expect("spec").load_balancer_class = Some("vipam.io/keepalived".into());
        assert!(may_have_been_managed(&svc, &class));
    }

    #[test]
    fn forward_method_is_case_insensitive_and_defaults() {
        let settings = Settings {
            default_forward_method: Some(ForwardMethod::Dr),
            proxy_protocol_mode: true,
            ..Default::default()
        };
        assert_eq!(
            desired(
                &mk_service(&[(FORWARD_METHOD_ANNOTATION, "nat")]),
                &settings
            )
            .forward_method,
            Some(ForwardMethod::Nat)
        );
        assert_eq!(
            desired(
                &mk_service(&[(FORWARD_METHOD_ANNOTATION, " Proxy ")]),
                &settings
            )
            .forward_method,
            Some(ForwardMethod::Proxy)
        );
        assert_eq!(
            desired(&mk_service(&[]), &settings).forward_method,
            Some(ForwardMethod::Dr)
        );
        assert_eq!(
            desired(&mk_service(&[]), &Settings::default()).forward_method,
            None
        );
    }

    #[test]
    fn an_invalid_forward_method_warns_and_uses_the_default() {
        let settings = Settings {
            default_forward_method: Some(ForwardMethod::Nat),
            ..Default::default()
        };
        let d = desired(
            &mk_service(&[(FORWARD_METHOD_ANNOTATION, "TUN")]),
            &settings,
        );
        assert_eq!(d.forward_method, Some(ForwardMethod::Nat));
        assert_eq!(d.warnings.len(), 1);
        assert!(
            d.warnings[0].to_string().contains("\"TUN\"")
                && d.warnings[0].to_string().contains("default NAT"),
            "{}",
            d.warnings[0]
        );
        assert!(
            d.request.is_ok(),
            "a bad forward method does not block allocation"
        );
    }

    /// What a Service annotated `proxy` gets under the settings.
    fn mk_proxy(settings: Settings) -> Desired {
        desired(
            &mk_service(&[(FORWARD_METHOD_ANNOTATION, "proxy")]),
            &settings,
        )
    }

    #[test]
    fn proxy_without_the_proxy_protocol_mode_warns_and_uses_the_default() {
        for (default, fallback) in [
            (Some(ForwardMethod::Nat), "the default NAT"),
            (None, "no forward method"),
        ] {
            let d = mk_proxy(Settings {
                default_forward_method: default,
                ..Default::default()
            });
            assert_eq!(d.forward_method, default);
            assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
            let message = d.warnings[0].to_string();
            for word in [
                FORWARD_METHOD_ANNOTATION,
                "\"proxy\"",
                "proxy-protocol mode",
                PROXY_PROTOCOL_SETTING,
                fallback,
            ] {
                assert!(message.contains(word), "{word:?} not in {message}");
            }
            assert!(d.request.is_ok(), "PROXY does not block allocation");
        }
    }

    #[test]
    fn proxy_with_the_proxy_protocol_mode_is_kept_without_a_warning() {
        let d = mk_proxy(Settings {
            proxy_protocol_mode: true,
            ..Default::default()
        });
        assert_eq!(d.forward_method, Some(ForwardMethod::Proxy));
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    #[test]
    fn a_default_proxy_method_is_refused_without_the_proxy_protocol_mode() {
        let error = check_default_method(Some(ForwardMethod::Proxy), false).expect_err("refused");
        for word in [
            "KEEPALIVED_DEFAULT_FORWARD_METHOD",
            "\"PROXY\"",
            PROXY_PROTOCOL_SETTING,
        ] {
            assert!(error.contains(word), "{word:?} not in {error}");
        }
        assert_eq!(
            check_default_method(Some(ForwardMethod::Proxy), true),
            Ok(())
        );
        for method in [None, Some(ForwardMethod::Nat), Some(ForwardMethod::Dr)] {
            assert_eq!(check_default_method(method, false), Ok(()), "{method:?}");
        }
    }

    fn mk_ports(svc: &mut Service, ports: &[(Option<&str>, i32, Option<IntOrString>)]) {
        svc.spec.as_mut().expect("spec").ports = Some(
            ports
                .iter()
                .map(|(name, port, target)| ServicePort {
                    name: name.map(Into::into),
                    port: *port,
                    target_port: target.clone(),
                    ..Default::default()
                })
                .collect(),
        );
    }

    #[test]
    fn dr_lists_the_numeric_target_ports_that_differ_and_skips_named_ones() {
        let mut svc = mk_service(&[(FORWARD_METHOD_ANNOTATION, "DR")]);
        mk_ports(
            &mut svc,
            &[
                (Some("http"), 80, Some(IntOrString::Int(8080))),
                (Some("https"), 443, Some(IntOrString::Int(443))),
                (None, 53, None),
                (
                    Some("metrics"),
                    9090,
                    Some(IntOrString::String("web".into())),
                ),
                (None, 25, Some(IntOrString::Int(2525))),
            ],
        );
        let d = desired(&svc, &Settings::default());
        assert_eq!(
            d.port_rewrites,
            vec![
                PortRewrite {
                    name: Some("http".into()),
                    port: 80,
                    target_port: 8080
                },
                PortRewrite {
                    name: None,
                    port: 25,
                    target_port: 2525
                },
            ]
        );
        assert_eq!(
            d.port_rewrites[0].to_string(),
            "port 80 (http) with targetPort 8080"
        );
        assert_eq!(
            d.port_rewrites[1].to_string(),
            "port 25 with targetPort 2525"
        );
    }

    #[test]
    fn only_the_effective_method_dr_lists_port_rewrites() {
        let ports = [(None, 80, Some(IntOrString::Int(8080)))];
        let dr_default = Settings {
            default_forward_method: Some(ForwardMethod::Dr),
            ..Default::default()
        };
        let mut plain = mk_service(&[]);
        mk_ports(&mut plain, &ports);
        assert_eq!(desired(&plain, &dr_default).port_rewrites.len(), 1);
        assert!(
            desired(&plain, &Settings::default())
                .port_rewrites
                .is_empty()
        );
        let mut nat = mk_service(&[(FORWARD_METHOD_ANNOTATION, "nat")]);
        mk_ports(&mut nat, &ports);
        assert!(desired(&nat, &dr_default).port_rewrites.is_empty());
    }

    #[test]
    fn the_address_annotation_wins_over_load_balancer_ip() {
        let mut svc = mk_service(&[(ADDRESS_ANNOTATION, "10.0.0.7")]);
        svc.spec.as_mut().expect("spec").load_balancer_ip = Some("10.0.0.8".into());
        assert_eq!(
            desired(&svc, &Settings::default())
                .request
                .expect("request")
                .address,
            Some("10.0.0.7".parse().expect("ip"))
        );
        let mut svc = mk_service(&[]);
        svc.spec.as_mut().expect("spec").load_balancer_ip = Some("10.0.0.8".into());
        assert_eq!(
            desired(&svc, &Settings::default())
                .request
                .expect("request")
                .address,
            Some("10.0.0.8".parse().expect("ip"))
        );
    }

    #[test]
    fn invalid_address_or_pool_blocks_allocation_naming_the_value() {
        for (key, value) in [
            (ADDRESS_ANNOTATION, "10.0.0.300"),
            (ADDRESS_ANNOTATION, "10.0.0.1,10.0.0.2"),
            (POOL_ANNOTATION, "Not_A_Pool"),
        ] {
            let problem = desired(&mk_service(&[(key, value)]), &Settings::default())
                .request
                .expect_err(value);
            assert_eq!(problem.field, key);
            assert_eq!(problem.value, value);
        }
        let mut svc = mk_service(&[]);
        svc.spec.as_mut().expect("spec").load_balancer_ip = Some("not-an-ip".into());
        assert_eq!(
            desired(&svc, &Settings::default())
                .request
                .expect_err("bad ip")
                .field,
            "spec.loadBalancerIP"
        );
    }

    #[test]
    fn pool_annotation_selects_a_pool() {
        let d = desired(
            &mk_service(&[(POOL_ANNOTATION, "dmz")]),
            &Settings::default(),
        );
        assert_eq!(
            d.request,
            Ok(Request {
                address: None,
                pool: Some("dmz".into()),
                adopt: false,
                moving: false,
            })
        );
    }

    #[test]
    fn status_ip_reads_the_first_ingress() {
        let mut svc = mk_service(&[]);
        assert_eq!(status_ip(&svc), None);
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("10.0.0.9".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        assert_eq!(status_ip(&svc), Some("10.0.0.9".parse().expect("ip")));
    }
}
