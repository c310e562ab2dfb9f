// The Mailbox test server's page: the list of mail, live, and one message.
// No framework, no build step; every text is set with textContent.
"use strict";

const api = "/api/v1";
let current = null; // the id shown
let latest = 0; // the highest id seen

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

async function getJSON(path) {
  const answer = await fetch(api + path, { cache: "no-store" });
  return { status: answer.status, body: await answer.json() };
}

function render(messages) {
  const tbody = document.getElementById("messages");
  tbody.replaceChildren();
  for (const m of messages) {
    const row = tbody.insertRow();
    row.className = "message" + (m.id === current ? " selected" : "");
    row.dataset.id = m.id;
    cell(row, String(m.id));
    cell(row, m.outbound ? "out" : "in");
    cell(row, m.envelope_from || "<>");
    cell(row, m.outbound ? m.recipients.join(", ") : m.account || "");
    cell(row, m.subject);
    row.addEventListener("click", () => { location.hash = "#" + m.id; });
    latest = Math.max(latest, m.id);
  }
  document.getElementById("empty").hidden = messages.length > 0;
}

async function refresh() {
  const { body } = await getJSON("/messages?outbound=any");
  render(body.messages);
}

// Long-poll: wait for anything newer than what is shown, then list again.
async function live() {
  const state = document.getElementById("state");
  for (;;) {
    try {
      await refresh();
      state.textContent = "live";
      await getJSON(`/wait?outbound=any&after=${latest}&timeout=25`);
    } catch (e) {
      state.textContent = "not connected";
      await new Promise((done) => setTimeout(done, 1000));
    }
  }
}

function tab(name) {
  for (const b of document.querySelectorAll("nav button")) {
    b.classList.toggle("active", b.dataset.tab === name);
  }
  for (const t of document.querySelectorAll(".tab")) {
    t.classList.toggle("active", t.id === "tab-" + name);
  }
}

async function show(id) {
  const detail = document.getElementById("detail");
  const { status, body } = await getJSON(`/messages/${id}`);
  if (status !== 200) {
    detail.hidden = true;
    return;
  }
  current = body.id;
  for (const row of document.querySelectorAll("tr.message")) {
    row.classList.toggle("selected", Number(row.dataset.id) === current);
  }
  detail.hidden = false;
  document.getElementById("subject").textContent = body.subject || "(no subject)";
  const headers = document.getElementById("headers");
  headers.replaceChildren();
  for (const [name, value] of body.headers) {
    const row = headers.insertRow();
    cell(row, name, "name");
    cell(row, value);
  }
  document.getElementById("text").textContent = body.text ?? "(no text part)";
  const frame = document.getElementById("html");
  frame.src = body.html != null ? `${api}/messages/${id}/html` : "about:blank";
  frame.dataset.id = id;
  const raw = await fetch(`${api}/messages/${id}/raw`, { cache: "no-store" });
  document.getElementById("raw").textContent = await raw.text();
  tab(body.html != null ? "html" : "text");
}

function route() {
  const id = Number(location.hash.slice(1));
  if (id > 0) show(id);
}

document.addEventListener("DOMContentLoaded", async () => {
  for (const b of document.querySelectorAll("nav button")) {
    b.addEventListener("click", () => tab(b.dataset.tab));
  }
  document.getElementById("images").addEventListener("click", () => {
    const frame = document.getElementById("html");
    if (frame.dataset.id) frame.src = `${api}/messages/${frame.dataset.id}/html?images=1`;
  });
  const { body } = await getJSON("");
  document.getElementById("server").textContent =
    `${body.domains.join(" ")}: SMTP ${body.host}:${body.smtp_port}, POP3 ${body.pop3_port}`;
  window.addEventListener("hashchange", route);
  route();
  live();
});
