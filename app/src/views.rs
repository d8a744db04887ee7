//! The Leptos components the pages are made of, rendered to HTML on the server.
//!
//! [`render`] runs a view inside a fresh reactive owner and returns the whole document. Forms
//! are `ActionForm`s on the server functions of [`crate::api`]: without WASM each renders a plain
//! `<form method="post" action="/api/...">`, which is all the site needs.

use crate::api::{CreateGateway, DeleteGateway, Login, Logout, RequeueDeadLetter, UpdateGateway};
use crate::chart;
use crate::data::{Device, FieldErrors, Gateway, GatewayForm, Listing, Tag};
use crate::paths;
use crate::pipeline::{Figure, PipelineState};
use axum::response::Html;
use chrono::{DateTime, Utc};
use dataviz_core::dead::DeadEntry;
use leptos::form::ActionForm;
use leptos::prelude::*;

/// Renders a whole page: `<!DOCTYPE html>` and the view built by `page`.
pub fn render<V: IntoView + 'static>(page: impl FnOnce() -> V) -> Html<String> {
    let owner = Owner::new();
    let html = owner.with(|| page().to_html());
    Html(format!("<!DOCTYPE html>{html}"))
}

/// A time as the site shows it.
pub fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The frame of every page: title, navigation, the signed-in user and the logout button.
#[component]
pub fn Layout(
    title: String,
    /// The signed-in user's email; `None` on the login page.
    #[prop(optional)]
    user: Option<String>,
    children: Children,
) -> impl IntoView {
    let nav = user.map(|email| {
        let logout = ServerAction::<Logout>::new();
        view! {
            <nav>
                <a href=paths::HOME class="brand">"Dataviz"</a>
                <a href=paths::GATEWAYS>"Gateways"</a>
                <a href=paths::DEVICES>"Devices"</a>
                <a href=paths::DEAD_LETTERS>"Dead letters"</a>
                <span class="user">{email}</span>
                <ActionForm action=logout>
                    <button type="submit" class="link">"Log out"</button>
                </ActionForm>
            </nav>
        }
    });
    view! {
        <html lang="en">
            <head>
                <meta charset="utf-8"/>
                <meta name="viewport" content="width=device-width, initial-scale=1"/>
                <title>{format!("{title} · Dataviz")}</title>
                <link rel="stylesheet" href=paths::STYLESHEET/>
            </head>
            <body>
                <header>{nav}</header>
                <main>
                    <h1>{title}</h1>
                    {children()}
                </main>
            </body>
        </html>
    }
}

/// A message at the top of a page: `ok` or `error`.
pub fn notice(kind: &'static str, text: Option<String>) -> impl IntoView {
    text.map(|text| view! { <p class=format!("notice {kind}") role="status">{text}</p> })
}

/// The message of a field, if it has one.
fn field_error(errors: &FieldErrors, field: &str) -> impl IntoView + use<> {
    errors
        .iter()
        .find(|(f, _)| *f == field)
        .map(|(_, message)| view! { <span class="field-error">{message.clone()}</span> })
}

/// A search box on a list page.
fn search(action: String, q: String, placeholder: &'static str) -> impl IntoView {
    view! {
        <form method="get" action=action class="search" role="search">
            <input type="search" name="q" value=q placeholder=placeholder aria-label=placeholder/>
            <button type="submit">"Search"</button>
        </form>
    }
}

/// "Page n of m" with previous and next links, keeping the search.
fn pager<T>(listing: &Listing<T>, path: &str, q: &str) -> impl IntoView + use<T> {
    let link = |page: i64| {
        let page = page.to_string();
        paths::with_query(path, &[("q", q), ("page", &page)])
    };
    let (page, pages) = (listing.page, listing.pages());
    let prev = (page > 1).then(|| view! { <a href=link(page - 1) rel="prev">"← Previous"</a> });
    let next = (page < pages).then(|| view! { <a href=link(page + 1) rel="next">"Next →"</a> });
    view! {
        <p class="pager">
            {prev}
            <span>{format!("Page {page} of {pages} · {} in all", listing.total)}</span>
            {next}
        </p>
    }
}

pub fn login_page(error: Option<String>, email: String, next: String) -> Html<String> {
    render(move || {
        let login = ServerAction::<Login>::new();
        view! {
            <Layout title="Log in".to_owned()>
                {notice("error", error)}
                <ActionForm action=login>
                    <label>"Email" <input type="email" name="email" value=email required autofocus/></label>
                    <label>"Password" <input type="password" name="password" required/></label>
                    <input type="hidden" name="next" value=next/>
                    <button type="submit">"Log in"</button>
                </ActionForm>
            </Layout>
        }
    })
}

pub fn forbidden(email: &str) -> Html<String> {
    let email = email.to_owned();
    render(move || {
        view! {
            <Layout title="Administrators only".to_owned() user=email.clone()>
                <p>{format!("You are signed in as {email}, which is not an administrator (ROLE_ADMIN).")}</p>
            </Layout>
        }
    })
}

fn figure<T, F: Fn(&T) -> String>(f: &Figure<T>, show: F) -> impl IntoView + use<T, F> {
    match f {
        Ok(v) => view! { <span class="figure">{show(v)}</span> }.into_any(),
        Err(e) => view! { <span class="figure unavailable" title=e.clone()>"unavailable"</span> }
            .into_any(),
    }
}

pub fn home(user: String, state: PipelineState) -> Html<String> {
    render(move || {
        view! {
            <Layout title="Dataviz".to_owned() user=user>
                <ul class="cards">
                    <li><a href=paths::GATEWAYS>"Gateways"</a></li>
                    <li><a href=paths::DEVICES>"Devices"</a></li>
                    <li><a href=paths::DEAD_LETTERS>"Dead letters"</a></li>
                </ul>
                <h2>"Pipeline"</h2>
                <dl class="pipeline">
                    <dt>"Last message received"</dt>
                    <dd id="last-received">{figure(&state.last_received, |t| t.map_or("never".to_owned(), when))}</dd>
                    <dt>"Messages received, not yet processed"</dt>
                    <dd id="raw-pending">{figure(&state.raw_pending, u64::to_string)}
                        {state.raw_in_progress.as_ref().ok().filter(|n| **n > 0).map(|n| format!(" (and {n} in progress)"))}
                    </dd>
                    <dt>"Dead letters"</dt>
                    <dd id="dead-letters"><a href=paths::DEAD_LETTERS>{figure(&state.dead_letters, u64::to_string)}</a></dd>
                </dl>
            </Layout>
        }
    })
}

pub fn gateways(
    user: String,
    listing: Listing<Gateway>,
    q: String,
    ok: Option<String>,
) -> Html<String> {
    render(move || {
        let rows = listing
            .items
            .iter()
            .map(|g| {
                view! {
                    <tr>
                        <td class="num">{g.id}</td>
                        <td>{g.name.clone()}</td>
                        <td>{g.description.clone()}</td>
                        <td class="num"><a href=paths::gateway_devices(g.id)>{g.devices}</a></td>
                        <td class="actions">
                            <a href=paths::gateway_edit(g.id)>"Edit"</a>
                            <a href=paths::gateway_delete(g.id)>"Delete"</a>
                        </td>
                    </tr>
                }
            })
            .collect_view();
        view! {
            <Layout title="Gateways".to_owned() user=user>
                {notice("ok", ok)}
                <p><a href=paths::GATEWAY_NEW class="button">"New gateway"</a></p>
                {search(paths::GATEWAYS.to_owned(), q.clone(), "Name or id")}
                <table>
                    <thead><tr><th>"Id"</th><th>"Name"</th><th>"Description"</th><th>"Devices"</th><th></th></tr></thead>
                    <tbody>{rows}</tbody>
                </table>
                {pager(&listing, paths::GATEWAYS, &q)}
            </Layout>
        }
    })
}

/// The form of a new gateway (`editing` = None) or of an existing one.
pub fn gateway_form(
    user: String,
    editing: Option<i32>,
    form: GatewayForm,
    errors: FieldErrors,
    error: Option<String>,
) -> Html<String> {
    render(move || {
        let title = match editing {
            None => "New gateway".to_owned(),
            Some(id) => format!("Gateway {id}"),
        };
        let fields = view! {
            <label>"Name" <input type="text" name="name" value=form.name.clone() required maxlength="200"/></label>
            {field_error(&errors, "name")}
            <label>"Description" <textarea name="description" maxlength="2000">{form.description.clone()}</textarea></label>
            {field_error(&errors, "description")}
        };
        let body = match editing {
            None => {
                let create = ServerAction::<CreateGateway>::new();
                view! {
                    <ActionForm action=create>
                        <label>"Id"
                            <input type="text" name="id" value=form.id.clone() inputmode="numeric"
                                placeholder="next free id"/>
                        </label>
                        {field_error(&errors, "id")}
                        <p class="hint">"Devices publish to gateways/<id>/<device>: give the id your gateway already uses."</p>
                        {fields}
                        <button type="submit">"Create"</button>
                        " " <a href=paths::GATEWAYS>"Cancel"</a>
                    </ActionForm>
                }
                .into_any()
            }
            Some(id) => {
                let update = ServerAction::<UpdateGateway>::new();
                view! {
                    <ActionForm action=update>
                        <input type="hidden" name="id" value=id.to_string()/>
                        {fields}
                        <button type="submit">"Save"</button>
                        " " <a href=paths::GATEWAYS>"Cancel"</a>
                    </ActionForm>
                }
                .into_any()
            }
        };
        view! {
            <Layout title=title user=user>
                {notice("error", error)}
                {body}
            </Layout>
        }
    })
}

pub fn gateway_delete(user: String, gateway: Gateway, error: Option<String>) -> Html<String> {
    render(move || {
        let body = if gateway.devices > 0 {
            view! {
                <p class="notice error" id="has-devices">
                    {format!(
                        "Gateway {} cannot be deleted: {} device(s) still hang on it, and their readings would lose their gateway. ",
                        gateway.id, gateway.devices
                    )}
                    <a href=paths::gateway_devices(gateway.id)>"See its devices"</a>
                </p>
            }
            .into_any()
        } else {
            let delete = ServerAction::<DeleteGateway>::new();
            view! {
                <p>{format!("Delete gateway {} ({})? This cannot be undone.", gateway.id, gateway.name)}</p>
                <ActionForm action=delete>
                    <input type="hidden" name="id" value=gateway.id.to_string()/>
                    <button type="submit" class="danger">"Delete"</button>
                    " " <a href=paths::GATEWAYS>"Cancel"</a>
                </ActionForm>
            }
            .into_any()
        };
        view! {
            <Layout title=format!("Delete gateway {}", gateway.id) user=user>
                {notice("error", error)}
                {body}
            </Layout>
        }
    })
}

pub fn devices(
    user: String,
    gateway: Option<Gateway>,
    listing: Listing<Device>,
    q: String,
) -> Html<String> {
    render(move || {
        let (title, path) = match &gateway {
            Some(g) => (
                format!("Devices of gateway {} ({})", g.id, g.name),
                paths::gateway_devices(g.id),
            ),
            None => ("Devices".to_owned(), paths::DEVICES.to_owned()),
        };
        let rows = listing
            .items
            .iter()
            .map(|d| {
                view! {
                    <tr>
                        <td><a href=paths::gateway_devices(d.gateway_id)>{format!("{} ({})", d.gateway_id, d.gateway_name)}</a></td>
                        <td><a href=paths::device(d.id)>{d.code.clone()}</a></td>
                        <td>{d.name.clone().unwrap_or_default()}</td>
                        <td class="num">{d.tags}</td>
                        <td>{when(d.last_seen_at)}</td>
                    </tr>
                }
            })
            .collect_view();
        view! {
            <Layout title=title user=user>
                {search(path.clone(), q.clone(), "Code starts with")}
                <table>
                    <thead><tr><th>"Gateway"</th><th>"Code"</th><th>"Name"</th><th>"Tags"</th><th>"Last seen"</th></tr></thead>
                    <tbody>{rows}</tbody>
                </table>
                {pager(&listing, &path, &q)}
            </Layout>
        }
    })
}

/// A chart of one numeric tag, drawn beforehand by [`chart::svg`].
#[derive(Debug, Clone)]
pub struct TagChart {
    pub code: String,
    pub svg: String,
}

/// What the device page needs to go live: the hub, the topic, a token for it and where to
/// renew it.
#[derive(Debug, Clone)]
pub struct Live {
    pub hub: String,
    pub topic: String,
    pub token: String,
    /// The token's life, in seconds.
    pub ttl: u64,
    pub token_url: String,
}

pub fn device(
    user: String,
    device: Device,
    tags: Vec<Tag>,
    range: chart::Range,
    charts: Vec<TagChart>,
    live: Option<Live>,
) -> Html<String> {
    render(move || {
        let rows = tags
            .iter()
            .map(|t| {
                view! {
                    <tr data-tag=t.code.clone()>
                        <td>{t.code.clone()}</td>
                        <td>{t.data_type.clone()}</td>
                        <td class="value">{t.last_value.clone().unwrap_or_default()}</td>
                        <td class="time">{t.last_time.map(when).unwrap_or_default()}</td>
                    </tr>
                }
            })
            .collect_view();
        let ranges = chart::RANGES
            .iter()
            .map(|r| {
                let href = format!("{}?range={}", paths::device(device.id), r.key);
                let class = if *r == range { "current" } else { "" };
                view! { <a href=href class=class>{r.label}</a> }
            })
            .collect_view();
        let charts = charts
            .into_iter()
            .map(|c| {
                view! {
                    <figure class="chart">
                        <figcaption>{c.code}</figcaption>
                        <div inner_html=c.svg></div>
                    </figure>
                }
            })
            .collect_view();
        let live = live.map(|live| {
            view! {
                <p id="live" class="live" data-hub=live.hub data-topic=live.topic
                    data-token=live.token data-ttl=live.ttl data-token-url=live.token_url>
                    "Live values need JavaScript."
                </p>
                <script inner_html=crate::live::SCRIPT></script>
            }
        });
        view! {
            <Layout title=format!("Device {}", device.code) user=user>
                <dl class="facts">
                    <dt>"Gateway"</dt>
                    <dd><a href=paths::gateway_devices(device.gateway_id)>{format!("{} ({})", device.gateway_id, device.gateway_name)}</a></dd>
                    <dt>"Name"</dt><dd>{device.name.clone().unwrap_or_default()}</dd>
                    <dt>"First seen"</dt><dd>{when(device.first_seen_at)}</dd>
                    <dt>"Last seen"</dt><dd>{when(device.last_seen_at)}</dd>
                </dl>
                <h2>"Tags"</h2>
                {live}
                <table id="tags">
                    <thead><tr><th>"Code"</th><th>"Data type"</th><th>"Last value"</th><th>"Last seen"</th></tr></thead>
                    <tbody>{rows}</tbody>
                </table>
                <h2>"History"</h2>
                <p class="ranges">{ranges}</p>
                {charts}
            </Layout>
        }
    })
}

fn dead_cells(entry: &DeadEntry) -> (String, String, String) {
    match &entry.letter {
        Ok(l) => (
            format!("{}/{}", l.stage, l.reason),
            l.raw.topic.clone(),
            l.error.clone(),
        ),
        Err(e) => ("unreadable".to_owned(), String::new(), e.to_string()),
    }
}

pub fn dead_letters(user: String, entries: Vec<DeadEntry>, ok: Option<String>) -> Html<String> {
    render(move || {
        let count = entries.len();
        let rows = entries
            .iter()
            .map(|e| {
                let (reason, topic, error) = dead_cells(e);
                view! {
                    <tr>
                        <td class="num"><a href=paths::dead_letter(e.seq)>{e.seq}</a></td>
                        <td>{when(e.stored_at)}</td>
                        <td>{reason}</td>
                        <td>{topic}</td>
                        <td class="error-text">{error}</td>
                    </tr>
                }
            })
            .collect_view();
        view! {
            <Layout title="Dead letters".to_owned() user=user>
                {notice("ok", ok)}
                <p>{format!("{count} shown, oldest first. Re-queue one from its page once its cause is fixed (e.g. its gateway now exists).")}</p>
                <table>
                    <thead><tr><th>"Id"</th><th>"Stored"</th><th>"Stage/reason"</th><th>"Topic"</th><th>"Error"</th></tr></thead>
                    <tbody>{rows}</tbody>
                </table>
            </Layout>
        }
    })
}

pub fn dead_letter(user: String, entry: DeadEntry, error: Option<String>) -> Html<String> {
    render(move || {
        let seq = entry.seq;
        let (reason, topic, message) = dead_cells(&entry);
        let (payload, received) = match &entry.letter {
            Ok(l) => (
                String::from_utf8_lossy(&l.raw.payload).into_owned(),
                when(l.raw.received_at),
            ),
            Err(_) => (String::new(), String::new()),
        };
        let requeue = entry.letter.is_ok().then(|| {
            let action = ServerAction::<RequeueDeadLetter>::new();
            view! {
                <ActionForm action=action>
                    <input type="hidden" name="seq" value=seq.to_string()/>
                    <button type="submit">"Re-queue"</button>
                </ActionForm>
            }
        });
        view! {
            <Layout title=format!("Dead letter {seq}") user=user>
                {notice("error", error)}
                <dl class="facts">
                    <dt>"Stored"</dt><dd>{when(entry.stored_at)}</dd>
                    <dt>"Stage/reason"</dt><dd>{reason}</dd>
                    <dt>"Error"</dt><dd class="error-text">{message}</dd>
                    <dt>"Topic"</dt><dd>{topic}</dd>
                    <dt>"Received"</dt><dd>{received}</dd>
                </dl>
                <h2>"Raw message"</h2>
                <pre class="raw">{payload}</pre>
                {requeue}
            </Layout>
        }
    })
}

/// A page for a missing thing.
pub fn not_found(user: String, what: String) -> Html<String> {
    render(move || {
        view! {
            <Layout title="Not found".to_owned() user=user>
                <p>{what}</p>
            </Layout>
        }
    })
}
