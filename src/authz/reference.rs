//! The reference: casbin-rs's own `Enforcer` over the same files, with our `pathMatch`
//! registered. Used to prove the index equivalent (differential tests), to validate files
//! in `secretgate policy check`, and as the baseline in the authorization benchmark.

use casbin::{
    CoreApi, DefaultModel, Enforcer, StringAdapter, function_map::OperatorFunction, rhai::Dynamic,
};

use super::{Action, pattern::path_match, policy::MODEL};

/// Builds a casbin enforcer for the supported model and `policy_csv`.
pub async fn enforcer(policy_csv: &str) -> Result<Enforcer, casbin::Error> {
    let model = DefaultModel::from_str(MODEL).await?;
    // casbin's string adapter does not skip comment lines; drop them as our parser does.
    let csv: String = policy_csv
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut e = Enforcer::new(model, StringAdapter::new(csv)).await?;
    e.add_function("pathMatch", OperatorFunction::Arg2(casbin_path_match));
    Ok(e)
}

/// Asks casbin.
pub fn decide(
    e: &Enforcer,
    subject: &str,
    path: &str,
    action: Action,
) -> Result<bool, casbin::Error> {
    e.enforce((subject, path, action.as_str()))
}

fn casbin_path_match(path: Dynamic, pattern: Dynamic) -> Dynamic {
    let (Ok(path), Ok(pattern)) = (path.into_string(), pattern.into_string()) else {
        return Dynamic::from(false);
    };
    Dynamic::from(path_match(&path, &pattern))
}
