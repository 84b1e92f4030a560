//! Credentials: the clients the operator configures (`--client`, and the
//! single all-powerful `--token-file`), each a name, a bearer token read
//! from a file and the [`Scope`] it grants; what each listener requires of a
//! call ([`Access`]); and the constant-time lookup of a presented token. No
//! gRPC: the service hands the header over and maps the [`AuthError`].

use std::{path::PathBuf, str::FromStr, sync::Arc};

use vipam::runtime::ConfigError;

use crate::{addresses::pool::Pools, model::Scope};

/// The name of the credential made from `--token-file`.
pub const TOKEN_FILE_CREDENTIAL: &str = "token-file";

/// Characters that separate the entries of `VIPAM_CLIENTS` and the keys of
/// a `--client` value from their values, so never part of a value (`,`
/// between parts and `|` between items cannot be either, by splitting).
const SEPARATORS: [char; 2] = [';', '='];

/// A bearer token.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token; surrounding white space is not part of it.
    pub fn new(token: &str) -> Option<Token> {
        let t = token.trim();
        (!t.is_empty()).then(|| Token(t.into()))
    }

    /// Compares in time independent of where the inputs differ.
    fn matches(&self, given: &[u8]) -> bool {
        let want = self.0.as_bytes();
        let mut diff = want.len() ^ given.len();
        for (i, w) in want.iter().enumerate() {
            diff |= usize::from(w ^ given.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

/// One `--client` value as given: `name=NAME,token-file=PATH,owners=P|P,pools=P|P`
/// (`*` for every owner or every pool). The token is read later, by
/// [`Credentials::load`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientDef {
    /// The flag value, for error messages (it holds no token).
    pub spec: String,
    /// The client's name.
    pub name: String,
    /// The file holding its token.
    pub token_file: PathBuf,
    /// Owner prefixes it may allocate and release; `None` for every owner.
    pub owners: Option<Vec<String>>,
    /// Pools it may draw from; `None` for every pool.
    pub pools: Option<Vec<String>>,
}

/// Splits `a|b|c`, or `*` for everything, refusing empty items.
fn parse_list(key: &str, value: &str) -> Result<Option<Vec<String>>, String> {
    if value == "*" {
        return Ok(None);
    }
    let items: Vec<String> = value.split('|').map(str::to_string).collect();
    if items.iter().any(String::is_empty) {
        return Err(format!(
            "{key}={value:?}: give items separated by '|', or '*' for all"
        ));
    }
    Ok(Some(items))
}

impl FromStr for ClientDef {
    type Err = String;

    fn from_str(spec: &str) -> Result<ClientDef, String> {
        let (mut name, mut token_file, mut owners, mut pools) = (None, None, None, None);
        for part in spec.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not KEY=VALUE"))?;
            let value = value.trim();
            if value
                .chars()
                .any(|c| c.is_control() || SEPARATORS.contains(&c))
            {
                return Err(format!(
                    "{key}={value:?}: contains a control character, ';' or '='"
                ));
            }
            let slot = match key.trim() {
                "name" => &mut name,
                "token-file" => &mut token_file,
                "owners" => &mut owners,
                "pools" => &mut pools,
                other => {
                    return Err(format!(
                        "unknown key {other:?} (expected name, token-file, owners, pools)"
                    ));
                }
            };
            if slot.replace(value).is_some() {
                return Err(format!("{key} is given twice"));
            }
        }
        fn need<'a>(v: Option<&'a str>, key: &str) -> Result<&'a str, String> {
            v.filter(|v| !v.is_empty()).ok_or_else(|| {
                format!("{key}= is missing (every client needs name, token-file, owners and pools)")
            })
        }
        let name = need(name, "name")?;
        if !vipam::names::is_pool_name(name) {
            return Err(format!(
                "name={name:?}: not a client name ({})",
                vipam::names::POOL_NAME_RULE
            ));
        }
        let pools = parse_list("pools", need(pools, "pools")?)?;
        for pool in pools.iter().flatten() {
            if !vipam::names::is_pool_name(pool) {
                return Err(format!("pools: {pool:?} is not a pool name"));
            }
        }
        Ok(ClientDef {
            spec: spec.to_string(),
            name: name.to_string(),
            token_file: PathBuf::from(need(token_file, "token-file")?),
            owners: parse_list("owners", need(owners, "owners")?)?,
            pools,
        })
    }
}

/// A configured client: its token and what it may touch.
#[derive(Clone, Debug)]
pub struct Credential {
    token: Token,
    scope: Scope,
}

/// Every configured credential.
#[derive(Clone, Debug, Default)]
pub struct Credentials(Vec<Credential>);

/// Why a call was not authenticated. Never holds the token presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// The call carries no bearer token and the listener needs one.
    Missing,
    /// The call carries a token no credential has.
    Unknown,
}

impl Credentials {
    /// The one all-powerful credential named [`TOKEN_FILE_CREDENTIAL`].
    pub fn single(token: Token) -> Credentials {
        Credentials(vec![Credential {
            token,
            scope: Scope {
                credential: TOKEN_FILE_CREDENTIAL.to_string(),
                owners: None,
                pools: None,
            },
        }])
    }

    /// The credentials of `--token-file` (if given) and every `--client`:
    /// refuses an unreadable or empty token file, a pool not in `pools`, a
    /// name or a token given twice, naming the flag and its value (never
    /// the token).
    pub fn load(
        token_file: Option<Token>,
        clients: &[ClientDef],
        pools: &Pools,
    ) -> Result<Credentials, ConfigError> {
        let mut all = token_file.map_or_else(Credentials::default, Credentials::single);
        for client in clients {
            let fail = |why: String| ConfigError(format!("--client {}: {why}", client.spec));
            for pool in client.pools.iter().flatten() {
                if pools.index_of(pool).is_none() {
                    return Err(fail(format!("pool {pool:?} does not exist")));
                }
            }
            let text = std::fs::read_to_string(&client.token_file)
                .map_err(|e| fail(format!("token-file {}: {e}", client.token_file.display())))?;
            let token = Token::new(&text).ok_or_else(|| {
                fail(format!(
                    "token-file {}: the file is empty",
                    client.token_file.display()
                ))
            })?;
            for other in &all.0 {
                if other.scope.credential == client.name {
                    return Err(fail(format!("the name {:?} is taken", client.name)));
                }
                if other.token.matches(token.0.as_bytes()) {
                    return Err(fail(format!(
                        "the token is the same as credential {:?}'s; give every client its own",
                        other.scope.credential
                    )));
                }
            }
            all.0.push(Credential {
                token,
                scope: Scope {
                    credential: client.name.clone(),
                    owners: client.owners.clone(),
                    pools: client.pools.clone(),
                },
            });
        }
        Ok(all)
    }

    /// Whether none is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The scope of the credential whose token is `given`. Compares with
    /// every credential, each in constant time, whichever matches.
    fn find(&self, given: &[u8]) -> Option<&Scope> {
        let mut found = None;
        for credential in &self.0 {
            if credential.token.matches(given) {
                found = Some(&credential.scope);
            }
        }
        found
    }
}

/// Which calls need a credential on a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// None: a call without a token may touch everything.
    Nothing,
    /// Allocate and Release (one listener with credentials configured).
    Changes,
    /// Every allocator call, reads included (`--listen-authenticated`).
    EveryCall,
}

/// What a listener requires of a call, and the credentials it checks.
#[derive(Clone, Debug)]
pub struct Access {
    /// The configured credentials.
    pub credentials: Arc<Credentials>,
    /// Which calls need one.
    pub needs: Needs,
}

impl Access {
    /// A listener where no call needs a credential and none is configured.
    pub fn open() -> Access {
        Access {
            credentials: Arc::default(),
            needs: Needs::Nothing,
        }
    }

    /// The scope of a call presenting `token` (the bearer token, when the
    /// call carries one). A token is always checked; without one, the call
    /// gets every right unless the listener needs a credential for it.
    pub fn scope(&self, token: Option<&[u8]>, changes: bool) -> Result<Scope, AuthError> {
        match token {
            Some(given) => self
                .credentials
                .find(given)
                .cloned()
                .ok_or(AuthError::Unknown),
            None => match self.needs {
                Needs::EveryCall => Err(AuthError::Missing),
                Needs::Changes if changes => Err(AuthError::Missing),
                Needs::Changes | Needs::Nothing => Ok(Scope::default()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::mk_pools;

    fn mk_token_file(dir: &tempfile::TempDir, name: &str, token: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, token).expect("token file");
        path.display().to_string()
    }

    fn mk_def(name: &str, file: &str, owners: &str, pools: &str) -> ClientDef {
        format!("name={name},token-file={file},owners={owners},pools={pools}")
            .parse()
            .expect("client def")
    }

    #[test]
    fn a_client_value_gives_name_token_file_owner_prefixes_and_pools() {
        let def = mk_def("tool", "/run/t", "vm:|lab:", "*");
        assert_eq!(def.name, "tool");
        assert_eq!(def.token_file, PathBuf::from("/run/t"));
        assert_eq!(def.owners, Some(vec!["vm:".into(), "lab:".into()]));
        assert_eq!(def.pools, None);
    }

    #[test]
    fn malformed_client_values_are_refused_saying_why() {
        for (spec, why) in [
            ("name=tool,token-file=/t,owners=vm:", "pools= is missing"),
            (
                "name=Tool,token-file=/t,owners=*,pools=*",
                "not a client name",
            ),
            (
                "name=t,token-file=/t,owners=a||b,pools=*",
                "separated by '|'",
            ),
            (
                "name=t,token-file=/t,owners=*,pools=*,colour=red",
                "unknown key",
            ),
            (
                "name=t,name=u,token-file=/t,owners=*,pools=*",
                "given twice",
            ),
            ("name=t,token-file=/t,owners=*,pools=Bad", "not a pool name"),
            ("name=t,token-file=/t,owners=a=b,pools=*", "';' or '='"),
        ] {
            let err = spec.parse::<ClientDef>().expect_err(spec);
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn loading_refuses_unknown_pools_empty_or_missing_files_and_repeated_names_or_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pools = mk_pools(&["vms=10.0.0.0/24"]);
        let a = mk_token_file(&dir, "a", "alpha-token\n");
        let b = mk_token_file(&dir, "b", "beta-token");
        let empty = mk_token_file(&dir, "empty", " \n");
        let missing = dir.path().join("missing").display().to_string();
        let cases = [
            (
                vec![mk_def("t", &a, "*", "other")],
                "pool \"other\" does not exist",
            ),
            (vec![mk_def("t", &empty, "*", "*")], "the file is empty"),
            (vec![mk_def("t", &missing, "*", "*")], "token-file"),
            (
                vec![mk_def("t", &a, "*", "*"), mk_def("t", &b, "*", "*")],
                "the name \"t\" is taken",
            ),
            (
                vec![mk_def("t", &a, "*", "*"), mk_def("u", &a, "*", "*")],
                "the same as credential \"t\"'s",
            ),
        ];
        for (defs, why) in cases {
            let err = Credentials::load(None, &defs, &pools).expect_err(why);
            let last = defs.last().expect("a def");
            assert!(err.0.contains(why), "{err}");
            assert!(err.0.contains(&format!("--client {}", last.spec)), "{err}");
            assert!(!err.0.contains("alpha-token"), "{err}");
        }
        let err = Credentials::load(
            Token::new("alpha-token"),
            &[mk_def("token-file", &b, "*", "*")],
            &pools,
        )
        .expect_err("name of --token-file taken");
        assert!(err.0.contains("is taken"), "{err}");
    }

    #[test]
    fn a_token_gets_its_credentials_scope_and_an_unknown_token_is_refused_on_any_listener() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pools = mk_pools(&["vms=10.0.0.0/24"]);
        let file = mk_token_file(&dir, "t", "tool-token");
        let credentials = Credentials::load(
            Token::new("admin-token"),
            &[mk_def("tool", &file, "vm:", "vms")],
            &pools,
        )
        .expect("load");
        for needs in [Needs::Nothing, Needs::Changes, Needs::EveryCall] {
            let access = Access {
                credentials: Arc::new(credentials.clone()),
                needs,
            };
            let tool = access.scope(Some(b"tool-token"), true).expect("tool");
            assert_eq!(tool.credential, "tool");
            assert_eq!(tool.owners, Some(vec!["vm:".to_string()]));
            assert_eq!(tool.pools, Some(vec!["vms".to_string()]));
            let admin = access.scope(Some(b"admin-token"), true).expect("admin");
            assert_eq!(admin.credential, TOKEN_FILE_CREDENTIAL);
            assert_eq!((admin.owners, admin.pools), (None, None));
            assert_eq!(
                access.scope(Some(b"tool-toke"), false),
                Err(AuthError::Unknown)
            );
        }
    }

    #[test]
    fn a_call_without_a_token_gets_every_right_unless_its_listener_needs_a_credential() {
        let needs_for = |needs, changes| {
            Access {
                credentials: Arc::new(Credentials::single(Token::new("x").expect("token"))),
                needs,
            }
            .scope(None, changes)
        };
        assert_eq!(needs_for(Needs::Nothing, true), Ok(Scope::default()));
        assert_eq!(needs_for(Needs::Changes, false), Ok(Scope::default()));
        assert_eq!(needs_for(Needs::Changes, true), Err(AuthError::Missing));
        assert_eq!(needs_for(Needs::EveryCall, false), Err(AuthError::Missing));
    }
}
