//! Applying the children: server-side apply with one field manager, a dry-run rehearsal
//! before a real change, and the put-back of the last full apply when the API server refuses
//! one part-way; the key Secret, created once.
use super::*;

/// Server-side applies every child (one field manager); returns what the API server stored.
///
/// All or nothing, as far as the API server decides: children that differ from the ones last
/// applied in full are first applied with `dryRun=All`, so a refusal (a node port taken, a
/// quota, an admission webhook, a missing permission) leaves every child as it was, rather than
/// rolling the Deployment to a configuration its Service never got. A refusal the rehearsal
/// could not foresee (a node port taken in between, an admission rule that lets dry runs pass)
/// puts the children last applied back, so the earlier ones do not keep the new version.
/// Re-applying the children last applied skips the rehearsal: a refusal part-way through cannot
/// mix two versions then. The record of the last full apply is this process's; without one
/// (`reconciled_before`, after a restart) it is read back from the children.
pub(super) async fn apply(children: Children, owner: &OwnerReference, ns: &str, name: &str, reconciled_before: bool, ctx: &Context) -> Result<(Deployment, Service)> {
    let children = children.owned_by(owner);
    let (encoded, digest) = children.encode()?;
    let children = children.stamped(&digest);
    let mut previous = ctx.applied.lock().unwrap_or_else(|e| e.into_inner()).get(&owner.uid).cloned();
    // After a restart: what was applied in full is read back from the children themselves.
    if previous.is_none() && reconciled_before {
        previous = recall_applied(&ctx.client, ns, name, &owner.uid).await;
        if let Some(recalled) = &previous {
            remember_applied(ctx, &owner.uid, recalled.clone());
        }
    }
    let unchanged = previous.as_ref().is_some_and(|p| p.digest == digest);
    // Putting the children back changes the Deployment, which triggers a reconcile at once; that
    // one must not try the same change again, or the Deployment would flip between the two.
    if let Some(held) = previous.as_ref().and_then(|p| p.held.as_ref()).filter(|h| h.digest == digest) {
        let remaining = held.until.saturating_duration_since(Instant::now());
        if !remaining.is_zero() {
            return Err(Error::Held(remaining));
        }
    }
    let pp = PatchParams::apply(labels::FIELD_MANAGER).force();
    if !unchanged {
        apply_children(&children, owner, ns, name, &pp.clone().dry_run(), ctx).await?;
    }
    ensure_key_secret(&ctx.client, ns, name, owner).await?;
    match apply_children(&children, owner, ns, name, &pp, ctx).await {
        Ok(applied) => {
            remember_applied(ctx, &owner.uid, Applied { digest, encoded: encoded.into(), held: None });
            Ok(applied)
        }
        Err(Error::Kube(kube::Error::Api(mut refusal))) if !unchanged => {
            // No record means no set was ever applied in full (or it could not be read back
            // after a restart): the refusal is only reported, as the rehearsal passed.
            if let Some(previous) = previous {
                let put_back = async { apply_children(&previous.children()?, owner, ns, name, &pp, ctx).await }.await;
                refusal.message = rolled_back_message(&refusal.message, put_back.as_ref().err());
                if let Some(entry) = ctx.applied.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&owner.uid) {
                    entry.held = Some(Held { digest, until: Instant::now() + HOLD_AFTER_PUT_BACK });
                }
                match put_back {
                    Ok(_) => tracing::warn!(spiceproxy = name, namespace = ns, reason = %refusal.message, "change refused after its dry run passed; the children last applied were put back"),
                    Err(e) => tracing::error!(spiceproxy = name, namespace = ns, error = %e, "change refused after its dry run passed, and putting the children last applied back failed"),
                }
            }
            Err(Error::Kube(kube::Error::Api(refusal)))
        }
        Err(e) => Err(e),
    }
}

/// The refusal's message, saying whether the children were put back as they were.
pub(super) fn rolled_back_message(refusal: &str, put_back_failed: Option<&Error>) -> String {
    match put_back_failed {
        None => format!("{refusal} (the objects already changed were put back as they were)"),
        Some(e) => format!("{refusal} (putting the objects already changed back failed too: {e}; retrying)"),
    }
}

/// The children of one SpiceProxy as last applied in full, and their digest.
#[derive(Clone)]
pub struct Applied {
    digest: String,
    /// The children unstamped, as `Children::encode` wrote them: JSON takes about a quarter of
    /// the memory of the typed objects, and is decoded only to put them back.
    encoded: Arc<[u8]>,
    /// A change refused after its rehearsal, and put back: not tried again until `until`.
    held: Option<Held>,
}

impl Applied {
    /// The digest of the set, as `Children::digest` computed it before applying.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The objects as applied, each stamped with the digest.
    pub fn children(&self) -> Result<Children> {
        Ok(serde_json::from_slice::<Children>(&self.encoded)?.stamped(&self.digest))
    }
}

/// `read_applied`, for a reconcile: a failed read only means that a change refused part-way
/// could not be put back, so it is logged and the change goes ahead, rehearsed.
pub(super) async fn recall_applied(client: &kube::Client, ns: &str, name: &str, owner_uid: &str) -> Option<Applied> {
    read_applied(client, ns, name, owner_uid).await.unwrap_or_else(|e| {
        tracing::warn!(spiceproxy = name, namespace = ns, error = %e, "could not read back the children last applied; a change refused part-way cannot be put back");
        None
    })
}

/// The children last applied in full, read back from the cluster (five reads at once): what
/// this operator applied to each (its managedFields entry), if every child is owned by the
/// SpiceProxy and carries the same set digest. None if any is missing or differs, as after an
/// apply stopped part-way, or by an operator that did not stamp them yet.
pub async fn read_applied(client: &kube::Client, ns: &str, name: &str, owner_uid: &str) -> Result<Option<Applied>> {
    let (config_map_name, policy_name) = (config_map_name(name), network_policy_name(name));
    let (config_maps, deployments, services, budgets, policies) = (
        Api::<ConfigMap>::namespaced(client.clone(), ns),
        Api::<Deployment>::namespaced(client.clone(), ns),
        Api::<Service>::namespaced(client.clone(), ns),
        Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        Api::<NetworkPolicy>::namespaced(client.clone(), ns),
    );
    let (config_map, deployment, service, disruption_budget, network_policy) = tokio::try_join!(
        config_maps.get_opt(&config_map_name),
        deployments.get_opt(name),
        services.get_opt(name),
        budgets.get_opt(name),
        policies.get_opt(&policy_name),
    )?;
    let (Some(config_map), Some(deployment), Some(service), Some(disruption_budget)) = (config_map, deployment, service, disruption_budget) else {
        return Ok(None);
    };
    // Someone else's NetworkPolicy of that name is not one of ours (and never touched).
    let network_policy = network_policy.filter(|p| p.owner_references().iter().any(|o| o.uid == owner_uid));
    Ok(applied_in_full(Children { config_map, deployment, service, disruption_budget, network_policy }, owner_uid))
}

/// `read_applied`'s judgement of the live children (pure).
pub(super) fn applied_in_full(mut live: Children, owner_uid: &str) -> Option<Applied> {
    let stamp = |meta: &ObjectMeta| meta.annotations.as_ref()?.get(labels::APPLIED_SET).cloned();
    let digest = stamp(&live.config_map.metadata)?;
    let one_set = live.metas_mut().all(|meta| stamp(meta).as_ref() == Some(&digest) && meta.owner_references.iter().flatten().any(|o| o.uid == owner_uid));
    if !one_set {
        return None;
    }
    let children = Children {
        config_map: managed_fields::applied_by(&live.config_map, labels::FIELD_MANAGER)?,
        deployment: managed_fields::applied_by(&live.deployment, labels::FIELD_MANAGER)?,
        service: managed_fields::applied_by(&live.service, labels::FIELD_MANAGER)?,
        disruption_budget: managed_fields::applied_by(&live.disruption_budget, labels::FIELD_MANAGER)?,
        network_policy: match &live.network_policy {
            Some(policy) => Some(managed_fields::applied_by(policy, labels::FIELD_MANAGER)?),
            None => None,
        },
    };
    let (encoded, _) = children.unstamped().encode().ok()?;
    Some(Applied { digest, encoded: encoded.into(), held: None })
}

#[derive(Clone)]
pub(super) struct Held {
    digest: String,
    until: Instant,
}

/// How long a change put back is not tried again: the first retry's delay, so retries follow
/// the backoff rather than the watch events the put-back itself causes.
pub(super) const HOLD_AFTER_PUT_BACK: std::time::Duration = crate::controller::RETRY_FIRST;

/// One pass over the children, for real or (with `pp.dry_run`) as a rehearsal.
pub(super) async fn apply_children(children: &Children, owner: &OwnerReference, ns: &str, name: &str, pp: &PatchParams, ctx: &Context) -> Result<(Deployment, Service)> {
    let client = &ctx.client;
    let Children { config_map, deployment, service, disruption_budget, network_policy } = children;
    Api::<ConfigMap>::namespaced(client.clone(), ns).patch(&config_map.name_any(), pp, &Patch::Apply(config_map)).await?;
    let deployment = Api::<Deployment>::namespaced(client.clone(), ns).patch(&deployment.name_any(), pp, &Patch::Apply(deployment)).await?;
    let service = Api::<Service>::namespaced(client.clone(), ns).patch(&service.name_any(), pp, &Patch::Apply(service)).await?;
    Api::<PodDisruptionBudget>::namespaced(client.clone(), ns).patch(&disruption_budget.name_any(), pp, &Patch::Apply(disruption_budget)).await?;
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), ns);
    match network_policy {
        Some(policy) => {
            policies.patch(&policy.name_any(), pp, &Patch::Apply(policy)).await?;
        }
        // Turned off: delete the one made before, and only if it is ours.
        None => {
            let ours = policies.get_opt(&network_policy_name(name)).await?.filter(|p| p.owner_references().iter().any(|o| o.uid == owner.uid));
            if let Some(policy) = ours {
                let dp = DeleteParams { dry_run: pp.dry_run, ..Default::default() };
                policies.delete(&policy.name_any(), &dp).await?;
            }
        }
    }
    Ok((deployment, service))
}

/// Records a full apply. Entries of deleted SpiceProxies are dropped once they could outnumber
/// the live ones, so the table stays the size of the cache.
pub(super) fn remember_applied(ctx: &Context, uid: &str, applied: Applied) {
    remember(&mut ctx.applied.lock().unwrap_or_else(|e| e.into_inner()), &ctx.proxies, uid, applied);
}

pub(super) fn remember<V>(applied: &mut HashMap<String, V>, live: &reflector::Store<DeserializeGuard<SpiceProxy>>, uid: &str, value: V) {
    applied.insert(uid.to_string(), value);
    if applied.len() > 2 * live.len() + 16 {
        let live = live.state();
        let uids: HashSet<&str> = live.iter().filter_map(|p| p.meta().uid.as_deref()).collect();
        // The one just applied stays even if the cache has not caught up with it yet.
        applied.retain(|kept, _| kept == uid || uids.contains(kept.as_str()));
    }
}

/// The ticket signing key. Created once with a random key and never overwritten, so every
/// replica (and every restart of the operator) keeps validating the tickets already issued.
pub(super) async fn ensure_key_secret(client: &kube::Client, ns: &str, spx: &str, owner: &OwnerReference) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = key_secret_name(spx);
    if api.get_metadata_opt(&name).await?.is_some() {
        return Ok(());
    }
    let key: [u8; 32] = rand::random();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(ns.into()),
            labels: Some(labels::proxy_labels(spx)),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(crate::proxy::ticket::CURRENT_KEY.into(), k8s_openapi::ByteString(key.to_vec()))])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The node address a NodePort URL names, when it names one (no externalAddress).
pub(super) async fn node_address(spx: &SpiceProxy, client: &kube::Client) -> Result<Option<String>> {
    if spx.spec.service.type_ == ServiceType::NodePort && spx.spec.external_address.is_none() { first_node_address(client).await } else { Ok(None) }
}

/// The Deployment and Service applied before for the SpiceProxy `owner_uid`, if both exist.
pub(super) async fn live_children(client: &kube::Client, ns: &str, name: &str, owner_uid: Option<&str>) -> Result<Option<(Deployment, Service)>> {
    let (deployments, services) = (Api::<Deployment>::namespaced(client.clone(), ns), Api::<Service>::namespaced(client.clone(), ns));
    let (deploy, svc) = tokio::try_join!(deployments.get_opt(name), services.get_opt(name))?;
    let owned = |meta: &ObjectMeta| meta.owner_references.iter().flatten().any(|o| Some(o.uid.as_str()) == owner_uid);
    Ok(deploy.filter(|d| owned(&d.metadata)).zip(svc.filter(|s| owned(&s.metadata))))
}

/// Address of a schedulable node for a NodePort URL: ExternalIP first, then InternalIP.
pub(super) async fn first_node_address(client: &kube::Client) -> Result<Option<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes.list(&ListParams::default().limit(50)).await?;
    let pick = |kind: &str| {
        list.items.iter().find_map(|n| {
            n.status.as_ref()?.addresses.as_ref()?.iter().find(|a| a.type_ == kind && !a.address.contains(':')).map(|a| a.address.clone())
        })
    };
    Ok(pick("ExternalIP").or_else(|| pick("InternalIP")))
}
