// clustermesh ui: the page. Hand-written, no framework, no build step.
//
// Data comes from the server as JSON (/api/events: server-sent events `mesh`, `map`,
// `flows`) and goes into the DOM only through createElement/createTextNode/textContent/
// setAttribute: never innerHTML. Labels and names are user input (a pod label may hold
// "<script>"), so this is what keeps them text.
'use strict';

(() => {
  const MAX_ROWS = 200;          // flows kept and shown in the table
  const COLLAPSE_TOTAL = 16;     // more workloads than this in the mesh: collapse big groups
  const COLLAPSE_GROUP = 4;      // ... those with more than this many
  const EDGE_LABELS_MAX = 20;    // more edges than this: labels only on dropped edges
  const SVGNS = 'http://www.w3.org/2000/svg';

  const S = {
    mesh: null,
    map: null,
    flows: [],                   // newest first
    filter: { cluster: '', pod: '', verdict: '' },
    es: null,
    backlogNext: true,           // the first `flows` after (re)connecting replaces the list
    dropped: 0,
    expanded: new Set(),         // groups the user opened
    collapsed: new Set(),        // groups the user closed
    selected: null,              // edge id shown in the detail panel
    lastMap: null,               // {flows, at} for the rate
    rate: 0,
    dirty: new Set(),
    timer: 0,
  };

  // ---- DOM helpers: text only -------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    append(e, children);
    return e;
  }
  function sv(tag, attrs, ...children) {
    const e = document.createElementNS(SVGNS, tag);
    setAttrs(e, attrs);
    append(e, children);
    return e;
  }
  function setAttrs(e, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      e.setAttribute(k, String(v));
    }
  }
  function append(e, children) {
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      e.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
    }
  }
  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); }
  const $ = (id) => document.getElementById(id);
  const short = (s, n) => (s.length > n ? s.slice(0, n - 1) + '…' : s);
  const label = (l) => l.replace(/^k8s:/, '');

  // ---- data in ----------------------------------------------------------------------
  function query(extra) {
    const p = new URLSearchParams();
    for (const k of ['cluster', 'pod', 'verdict']) if (S.filter[k]) p.set(k, S.filter[k]);
    for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
    return p.toString();
  }

  function connect() {
    if (S.es) S.es.close();
    S.backlogNext = true;
    const es = new EventSource('/api/events?' + query({ last: MAX_ROWS }));
    S.es = es;
    setLive('connecting', 'connecting…');
    es.onopen = () => { S.backlogNext = true; setLive('live', 'live'); };
    es.onerror = () => setLive('lost', 'connection lost, retrying…');
    es.addEventListener('mesh', (e) => { S.mesh = JSON.parse(e.data); schedule('mesh', 'map'); });
    es.addEventListener('map', (e) => {
      S.map = JSON.parse(e.data);
      const now = performance.now();
      if (S.lastMap && now > S.lastMap.at) {
        S.rate = Math.max(0, (S.map.flows - S.lastMap.flows) * 1000 / (now - S.lastMap.at));
      }
      S.lastMap = { flows: S.map.flows, at: now };
      schedule('map', 'header', 'flows');
    });
    es.addEventListener('flows', (e) => {
      const m = JSON.parse(e.data);
      S.dropped = m.dropped || 0;
      const batch = m.flows.slice().reverse();
      S.flows = S.backlogNext ? batch : batch.concat(S.flows);
      S.backlogNext = false;
      if (S.flows.length > MAX_ROWS) S.flows.length = MAX_ROWS;
      schedule('flows', 'header');
    });
  }

  function setLive(state, text) {
    const l = $('live');
    l.dataset.state = state;
    l.textContent = text;
  }

  function schedule(...parts) {
    for (const p of parts) S.dirty.add(p);
    if (!S.timer) S.timer = setTimeout(render, 40);
  }

  function render() {
    S.timer = 0;
    const d = S.dirty;
    S.dirty = new Set();
    // One part failing (unexpected data) must not blank the others.
    for (const [part, f] of [['header', renderHeader], ['mesh', renderMesh], ['map', renderMap], ['flows', renderFlows]]) {
      if (!d.has(part)) continue;
      try { f(); } catch (err) { console.error(`rendering ${part}:`, err); setLive('lost', `cannot show the ${part}: ${err}`); }
    }
  }

  // ---- header -----------------------------------------------------------------------
  function renderHeader() {
    $('rate').textContent = S.map ? `${S.rate.toFixed(1)} flows/s · ${S.map.flows} seen` : '';
    const du = $('dropped-updates');
    du.hidden = S.dropped === 0;
    du.textContent = `⚠ ${S.dropped} flow updates dropped: this page could not keep up (the map still counts them)`;
  }

  // ---- clusters ---------------------------------------------------------------------
  const REMOTE_TEXT = { ready: 'ready', syncing: 'syncing', failing: 'failing' };
  const AGENT_TEXT = { ready: 'agent ready', 'not-ready': 'agent not ready', 'not-answering': 'agent not answering', none: 'no agent' };

  function renderMesh() {
    const m = S.mesh;
    const root = $('clusters');
    clear(root);
    if (!m) return;
    if (m.lab) {
      $('lab').textContent = `lab ${m.lab.id} · ${m.lab.dir}`;
      document.title = `clustermesh · lab ${m.lab.id}`;
    }
    let nodes = 0, bad = 0;
    for (const c of m.clusters || []) {
      const api = c.apiserver;
      const apiState = api.reachable ? (api.ready ? 'ready' : 'not-ready') : 'not-answering';
      const card = el('section', { class: 'cluster', 'data-cluster': c.name },
        el('h3', {}, c.name, el('span', { class: 'muted' }, ` ID ${c.id}`)),
        el('div', { class: 'apiserver', 'data-state': apiState },
          el('span', { class: 'badge ' + apiState }, api.reachable ? (api.ready ? 'apiserver ready' : 'apiserver not ready') : 'apiserver not answering'),
          el('span', { class: 'muted' }, ` ${api.health || ''}`),
          api.error ? el('div', { class: 'hint' }, api.error) : null),
      );
      if (c.etcd_error) card.appendChild(el('div', { class: 'hint' }, c.etcd_error));
      const remotes = el('ul', { class: 'remotes' });
      for (const r of api.remotes || []) {
        if (r.state !== 'ready') bad++;
        remotes.appendChild(el('li', { class: 'remote', 'data-remote': r.name, 'data-state': r.state },
          el('span', { class: 'arrow' }, '⇄ '), el('strong', {}, r.name), ' ',
          el('span', { class: 'badge ' + r.state }, REMOTE_TEXT[r.state] || r.state),
          r.nodes != null ? el('span', { class: 'muted' }, ` ${r.nodes} nodes · ${r.endpoints} endpoints · ${r.identities} identities`) : null,
          r.hint ? el('div', { class: 'hint' }, r.hint) : null));
      }
      if (!(api.remotes || []).length) remotes.appendChild(el('li', { class: 'muted' }, api.reachable ? 'no remote cluster configured' : 'remotes unknown (apiserver not answering)'));
      card.appendChild(remotes);
      const list = el('ul', { class: 'nodes' });
      for (const n of c.nodes) {
        nodes++;
        const obs = n.observer;
        const state = n.agent.state === 'ready' && obs && obs.state === 'failing' ? 'not-answering' : n.agent.state;
        if (state !== 'ready') bad++;
        const li = el('li', { class: 'node', 'data-node': n.name, 'data-state': state },
          el('div', {}, el('strong', {}, n.name), el('span', { class: 'muted' }, ` ${n.ip} `),
            el('span', { class: 'badge ' + n.agent.state }, AGENT_TEXT[n.agent.state] || n.agent.state),
            obs ? el('span', { class: 'badge obs ' + obs.state }, obs.state === 'following' ? `flows: ${obs.flows}` : `observer ${obs.state}`) : null),
          n.agent.state !== 'ready' && n.agent.detail ? el('div', { class: 'hint' }, n.agent.detail) : null,
          obs && obs.error ? el('div', { class: 'hint' }, obs.error) : null,
          el('details', { class: 'pods' }, el('summary', {}, `${n.pods.length} pods`),
            el('ul', {}, n.pods.map((p) => el('li', {}, `${p.namespace}/${p.name} `, el('span', { class: 'muted' }, p.ip))))));
        list.appendChild(li);
      }
      card.appendChild(list);
      root.appendChild(card);
    }
    for (const o of m.observers || []) {
      bad += o.state === 'following' ? 0 : 1;
      root.appendChild(el('section', { class: 'cluster observer-only' },
        el('h3', {}, o.address),
        el('div', { class: 'node', 'data-state': o.state === 'following' ? 'ready' : 'not-answering' },
          el('span', { class: 'badge obs ' + o.state }, o.state === 'following' ? `flows: ${o.flows}` : `observer ${o.state}`),
          o.error ? el('div', { class: 'hint' }, o.error) : null)));
    }
    $('clusters-summary').textContent = (m.clusters || []).length
      ? `${m.clusters.length} clusters · ${nodes} nodes · ${bad ? bad + ' problems' : 'all ready'}`
      : `${(m.observers || []).length} observers`;
  }

  // ---- service map ------------------------------------------------------------------
  const BOX_W = 196, BOX_H = 46, GAP = 14, GROUP_W = BOX_W + 24, HEAD = 46, PAD = 40;

  function nodeTitle(n) {
    if (n.kind === 'service') return `svc ${n.name}`;
    if (n.kind === 'reserved') return n.labels[0] ? label(n.labels[0]) : n.key;
    if (n.kind === 'ip') return n.key.replace(/^ip:/, '');
    const ls = n.labels.map(label);
    return ls.length ? ls.join(' ') : `identity ${n.identity}`;
  }
  function nodeSub(n) {
    if (n.kind === 'service') return `${n.frontends.join(' ')} · ${n.backends.length + (n.unknown_backends || []).length} backends`;
    const pods = [...n.pods].map((p) => p.replace(/^[^/]*\//, ''));
    const more = n.more_pods ? ` +${n.more_pods}` : '';
    const id = n.identity ? `ID ${n.identity} · ` : '';
    return id + (pods.length === 1 ? pods[0] : pods.length ? `${pods.length} pods${more}` : 'no pods');
  }

  function groupsOf(map, mesh) {
    const order = mesh && mesh.clusters ? mesh.clusters.map((c) => c.name) : [];
    const groups = new Map();
    const group = (name) => {
      if (!groups.has(name)) groups.set(name, { name, nodes: [], services: [] });
      return groups.get(name);
    };
    for (const c of order) group(c);
    for (const n of map.nodes) {
      const g = group(n.cluster || '');
      (n.kind === 'service' ? g.services : g.nodes).push(n);
    }
    const named = [...groups.values()].filter((g) => g.name !== '');
    named.sort((a, b) => (order.indexOf(a.name) + 1 || 1e9) - (order.indexOf(b.name) + 1 || 1e9) || a.name.localeCompare(b.name));
    const outside = groups.get('');
    if (outside && (outside.nodes.length || outside.services.length)) named.push(outside);
    for (const g of named) g.nodes.sort((a, b) => nodeTitle(a).localeCompare(nodeTitle(b)));
    return named;
  }

  function isCollapsed(g, total) {
    if (g.name === '') return false;
    if (S.collapsed.has(g.name)) return true;
    if (S.expanded.has(g.name)) return false;
    return total > COLLAPSE_TOTAL && g.nodes.length > COLLAPSE_GROUP;
  }

  function renderMap() {
    const svg = $('map');
    clear(svg);
    const map = S.map;
    if (!map) return;
    const groups = groupsOf(map, S.mesh);
    const total = groups.reduce((s, g) => s + g.nodes.length, 0);
    // Room between groups for the edges: whatever the page is wide, within limits.
    const avail = Math.max(600, $('map-wrap').clientWidth - 4);
    const between = groups.length > 1
      ? Math.min(380, Math.max(140, (avail - 2 * PAD - groups.length * GROUP_W) / (groups.length - 1)))
      : 0;
    const COL_W = GROUP_W + between;
    const pos = new Map();     // visible key -> {x, y, col}
    const visible = new Map(); // node key -> visible key
    let height = 0;

    const defs = sv('defs', {});
    for (const v of ['forwarded', 'dropped']) {
      defs.appendChild(sv('marker', { id: 'arrow-' + v, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
        sv('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrowhead ' + v })));
    }
    svg.appendChild(defs);
    const groupLayer = sv('g', { class: 'groups' });
    const edgeLayer = sv('g', { class: 'edges' });
    const nodeLayer = sv('g', { class: 'nodes' });
    svg.append(groupLayer, edgeLayer, nodeLayer);

    groups.forEach((g, col) => {
      const x = PAD + col * COL_W;
      const collapsed = isCollapsed(g, total);
      const items = collapsed ? [] : g.services.concat(g.nodes);
      const h = HEAD + (collapsed ? BOX_H + GAP : items.length * (BOX_H + GAP)) + PAD / 2;
      height = Math.max(height, h);
      const gkey = 'group:' + g.name;
      const title = g.name === '' ? 'outside the mesh' : g.name;
      const ge = sv('g', { class: 'cluster-group' + (collapsed ? ' collapsed' : ''), 'data-cluster': g.name, 'data-collapsed': collapsed ? 'true' : 'false' },
        sv('rect', { x, y: PAD, width: GROUP_W, height: h, rx: 10, class: 'group-box' }),
        sv('text', { x: x + 12, y: PAD + 20, class: 'group-title' }, title),
        sv('text', { x: x + 12, y: PAD + 36, class: 'group-sub' },
          `${g.nodes.length} workloads${g.services.length ? ', ' + g.services.length + ' services' : ''}`),
      );
      if (g.name !== '') {
        const toggle = sv('text', { x: x + BOX_W + 8, y: PAD + 20, class: 'toggle', 'text-anchor': 'end', role: 'button', 'data-cluster': g.name },
          collapsed ? '▸ expand' : '▾ collapse');
        toggle.addEventListener('click', () => {
          if (collapsed) { S.collapsed.delete(g.name); S.expanded.add(g.name); } else { S.expanded.delete(g.name); S.collapsed.add(g.name); }
          renderMap();
        });
        ge.appendChild(toggle);
      }
      groupLayer.appendChild(ge);
      if (collapsed) {
        pos.set(gkey, { x: x + 12, y: PAD + HEAD, col });
        for (const n of g.nodes.concat(g.services)) visible.set(n.key, gkey);
        const pods = g.nodes.reduce((s, n) => s + n.pods.length + (n.more_pods || 0), 0);
        const box = sv('g', { class: 'node group-node', 'data-key': gkey, 'data-cluster': g.name, role: 'button' },
          sv('rect', { x: x + 12, y: PAD + HEAD, width: BOX_W, height: BOX_H, rx: 6 }),
          sv('text', { x: x + 20, y: PAD + HEAD + 18, class: 'node-title' }, `${g.nodes.length} workloads, ${pods} pods`),
          sv('text', { x: x + 20, y: PAD + HEAD + 35, class: 'node-sub' }, 'collapsed: click to expand'),
          sv('title', {}, g.nodes.map(nodeTitle).join('\n')));
        box.addEventListener('click', () => { S.collapsed.delete(g.name); S.expanded.add(g.name); renderMap(); });
        nodeLayer.appendChild(box);
        return;
      }
      items.forEach((n, i) => {
        const y = PAD + HEAD + i * (BOX_H + GAP);
        pos.set(n.key, { x: x + 12, y, col });
        visible.set(n.key, n.key);
        const pods = [...n.pods].map((p) => p.replace(/^[^/]*\//, ''));
        nodeLayer.appendChild(sv('g', { class: 'node ' + n.kind, 'data-key': n.key, 'data-cluster': n.cluster, 'data-kind': n.kind, 'data-pods': pods.join(' ') },
          sv('rect', { x: x + 12, y, width: BOX_W, height: BOX_H, rx: n.kind === 'service' ? 22 : 6 }),
          sv('text', { x: x + 20, y: y + 18, class: 'node-title' }, short(nodeTitle(n), 30)),
          sv('text', { x: x + 20, y: y + 35, class: 'node-sub' }, short(nodeSub(n), 34)),
          sv('title', {}, `${nodeTitle(n)}\n${n.key}\n${n.labels.map(label).join('\n')}\n${[...n.pods].join('\n')}`)));
      });
    });

    // Service → backend links (within a visible group only).
    for (const g of groups) {
      for (const s of g.services) {
        const a = pos.get(visible.get(s.key));
        if (!a || visible.get(s.key) !== s.key) continue;
        for (const b of s.backends) {
          const p = pos.get(visible.get(b));
          if (!p || visible.get(b) !== b) continue;
          const x = a.x, y1 = a.y + BOX_H / 2, y2 = p.y + BOX_H / 2;
          edgeLayer.appendChild(sv('path', { class: 'backs', d: `M${x},${y1} C${x - 26},${y1} ${x - 26},${y2} ${x},${y2}` }));
        }
      }
    }

    // Flow edges, aggregated to what is visible.
    const agg = new Map();
    let inside = 0;
    for (const e of map.edges) {
      const f = visible.get(e.from) || e.from, t = visible.get(e.to) || e.to;
      if (!pos.has(f) || !pos.has(t)) continue;
      if (f === t && f.startsWith('group:')) { inside += e.forwarded + e.dropped; continue; }
      const id = f + '→' + t;
      const a = agg.get(id) || { id, from: f, to: t, forwarded: 0, dropped: 0, rate: 0, verdict: 'forwarded', edges: [], idle: Infinity };
      a.forwarded += e.forwarded; a.dropped += e.dropped; a.rate += e.rate;
      a.idle = Math.min(a.idle, e.idle_s);
      if (e.verdict === 'dropped') a.verdict = 'dropped';
      a.edges.push(e);
      agg.set(id, a);
    }
    const showLabels = agg.size <= EDGE_LABELS_MAX;
    let dropped = 0;
    for (const a of agg.values()) {
      if (a.verdict === 'dropped') dropped++;
      const p = pos.get(a.from), q = pos.get(a.to);
      const cf = clusterOfKey(a.from, map), ct = clusterOfKey(a.to, map);
      let d, mx, my;
      if (a.from === a.to) {
        const x = p.x + BOX_W, y = p.y + 10;
        d = `M${x},${y} c30,-22 30,26 0,${BOX_H - 20}`;
        mx = x + 26; my = y + 12;
      } else if (p.col === q.col) {
        // Inside a group: an arc on the outer side (left in the left half of the map), away
        // from the edges between groups.
        const left = p.col < (groups.length - 1) / 2;
        const x = left ? p.x : p.x + BOX_W, y1 = p.y + BOX_H / 2 - 5, y2 = q.y + BOX_H / 2 + 5;
        const bulge = (left ? -1 : 1) * (24 + Math.min(24, Math.abs(y2 - y1) / 6));
        d = `M${x},${y1} C${x + bulge},${y1} ${x + bulge},${y2} ${x},${y2}`;
        mx = x + bulge * 0.75; my = (y1 + y2) / 2;
      } else {
        const right = q.col > p.col;
        const off = right ? -6 : 6;
        const x1 = right ? p.x + BOX_W : p.x, x2 = right ? q.x : q.x + BOX_W;
        const y1 = p.y + BOX_H / 2 + off, y2 = q.y + BOX_H / 2 + off;
        const c = (x2 - x1) / 2;
        d = `M${x1},${y1} C${x1 + c},${y1} ${x2 - c},${y2} ${x2},${y2}`;
        mx = (x1 + x2) / 2; my = (y1 + y2) / 2;
      }
      const width = 1.4 + Math.min(3, Math.log10(1 + a.rate) * 1.5);
      const text = [a.forwarded ? `✓${a.forwarded}` : '', a.dropped ? `✗${a.dropped}` : '', a.rate ? `${a.rate.toFixed(1)}/s` : ''].filter(Boolean).join(' ');
      const g = sv('g', { class: `edge ${a.verdict}${a.idle > 60 ? ' idle' : ''}${S.selected === a.id ? ' selected' : ''}`, 'data-from': a.from, 'data-to': a.to, 'data-from-cluster': cf, 'data-to-cluster': ct, 'data-verdict': a.verdict, 'data-forwarded': a.forwarded, 'data-dropped': a.dropped, role: 'button' },
        sv('path', { d, class: 'edge-hit' }),
        sv('path', { d, class: 'edge-line', 'stroke-width': width.toFixed(1), 'marker-end': `url(#arrow-${a.verdict})` }),
        sv('title', {}, `${a.from} → ${a.to}\n${text}`));
      if (showLabels || a.verdict === 'dropped') {
        const t = sv('text', { x: mx, y: my - 3, class: 'edge-label', 'text-anchor': 'middle' }, text);
        g.appendChild(t);
      }
      g.addEventListener('click', () => { S.selected = a.id; renderMap(); });
      edgeLayer.appendChild(g);
      if (S.selected === a.id) renderEdgeDetail(a, map);
    }
    if (S.selected && !agg.has(S.selected)) { S.selected = null; $('edge-detail').hidden = true; }
    const width = PAD * 2 + groups.length * GROUP_W + Math.max(0, groups.length - 1) * between;
    svg.setAttribute('viewBox', `0 0 ${width} ${height + PAD * 2}`);
    svg.setAttribute('width', width);
    svg.setAttribute('height', height + PAD * 2);
    $('map-summary').textContent = `${total} workloads · ${agg.size} edges${dropped ? ` · ${dropped} with drops` : ''}${inside ? ` · ${inside} flows inside collapsed groups` : ''}${total > COLLAPSE_TOTAL ? ' · big clusters collapsed (click to expand)' : ''}`;
  }

  function clusterOfKey(key, map) {
    if (key.startsWith('group:')) return key.slice(6);
    const n = map.nodes.find((x) => x.key === key);
    return n ? n.cluster : '';
  }

  function describeNode(key, map) {
    const n = map.nodes.find((x) => x.key === key);
    if (!n) return key;
    return `${nodeTitle(n)} (${n.cluster ? n.cluster + ', ' : ''}${nodeSub(n)})`;
  }

  function renderEdgeDetail(a, map) {
    const box = $('edge-detail');
    clear(box);
    box.hidden = false;
    const close = el('button', { type: 'button', class: 'close' }, 'close');
    close.addEventListener('click', () => { S.selected = null; box.hidden = true; renderMap(); });
    box.append(el('h3', {}, describeNode(a.from, map), ' → ', describeNode(a.to, map)), close);
    const rows = el('ul', {});
    for (const e of a.edges) {
      const drop = e.last_drop;
      rows.appendChild(el('li', {},
        el('strong', {}, `${e.from} → ${e.to}: `),
        `${e.forwarded} forwarded, ${e.dropped} dropped, ${e.rate.toFixed(1)}/s, ports ${[...e.ports].join(', ')}, last flow ${e.idle_s}s ago`,
        drop ? el('div', { class: 'drop' }, `last drop: by the ${drop.side} policy of ${describeNode(drop.by, map)}; identities ${drop.src_identity} → ${drop.dst_identity}; ${drop.reason}${drop.policy_match ? ' (match ' + drop.policy_match + ')' : ''}; reported by ${drop.node} at ${drop.time}`) : null));
    }
    box.appendChild(rows);
  }

  // ---- flows ------------------------------------------------------------------------
  function endpoint(e) {
    if (!e) return el('span', { class: 'muted' }, '?');
    const name = e.pod_name ? `${e.namespace}/${e.pod_name}` : e.IP;
    const labels = (e.labels || []).filter((l) => !/io\.kubernetes\.pod\.namespace=|io\.cilium\.k8s\.policy\.cluster=|io\.cilium\.k8s\.namespace\.labels\.|io\.cilium\.k8s\.policy\.serviceaccount=/.test(l));
    return el('div', { class: 'ep' },
      el('span', { class: 'ep-name' }, name + (e.port ? `:${e.port}` : '')),
      e.cluster_name ? el('span', { class: 'cluster-tag' }, e.cluster_name) : null,
      el('div', { class: 'ep-labels' }, `ID ${e.identity}`, labels.map((l) => el('span', { class: 'label' }, label(l)))));
  }

  function details(f) {
    const l4 = f.l4 || {};
    const parts = [l4.protocol || ''];
    if (l4.tcp_flags && l4.tcp_flags.length) parts.push(l4.tcp_flags.join(','));
    parts.push(`${(f.traffic_direction || '').toLowerCase()} at ${f.observation_point || '?'}`);
    const out = el('div', {}, parts.join(' · '));
    if (f.verdict === 'DROPPED') {
      const ingress = f.traffic_direction === 'INGRESS';
      const who = ingress ? f.destination : f.source;
      const whoName = who ? (who.pod_name ? `${who.namespace}/${who.pod_name}` : who.IP) : '?';
      out.appendChild(el('div', { class: 'drop' },
        `${f.drop_reason_desc || 'dropped'}: by the ${ingress ? 'ingress' : 'egress'} policy of ${whoName}${who && who.cluster_name ? ' (' + who.cluster_name + ')' : ''}; identities ${f.source ? f.source.identity : '?'} → ${f.destination ? f.destination.identity : '?'}${f.policy_match ? '; match ' + f.policy_match : ''}`));
    }
    return out;
  }

  function renderFlows() {
    const body = $('flow-rows');
    clear(body);
    for (const f of S.flows) {
      body.appendChild(el('tr', {
        class: 'flow ' + (f.verdict || '').toLowerCase(),
        'data-verdict': f.verdict,
        'data-seq': f.seq,
        'data-src-cluster': f.source ? f.source.cluster_name : '',
        'data-dst-cluster': f.destination ? f.destination.cluster_name : '',
        'data-src-pod': f.source ? f.source.pod_name : '',
        'data-dst-pod': f.destination ? f.destination.pod_name : '',
        'data-sport': f.source ? f.source.port : '',
      },
      el('td', { class: 'time' }, (f.time || '').slice(11, 23)),
      el('td', {}, f.node),
      el('td', {}, endpoint(f.source)),
      el('td', {}, endpoint(f.destination)),
      el('td', {}, el('span', { class: 'verdict ' + (f.verdict || '').toLowerCase() }, f.verdict)),
      el('td', { class: 'details' }, details(f))));
    }
    const empty = $('flows-empty');
    const active = Object.entries(S.filter).filter(([, v]) => v).map(([k, v]) => `${k}=${v}`);
    const seen = S.map ? S.map.flows : 0;
    if (S.flows.length === 0) {
      empty.hidden = false;
      empty.textContent = active.length
        ? `No flow matches ${active.join(', ')} (of ${seen} flows the UI has seen). Change or clear the filter.`
        : 'No flows yet: make some traffic (for example `clustermesh connectivity test`).';
    } else {
      empty.hidden = true;
    }
    $('flow-count').textContent = `${S.flows.length} shown${active.length ? ' matching ' + active.join(', ') : ''} · newest first`;
  }

  // ---- filters ----------------------------------------------------------------------
  function readFilter() {
    S.filter = {
      cluster: $('filter-cluster').value.trim(),
      pod: $('filter-pod').value.trim(),
      verdict: $('filter-verdict').value,
    };
  }

  function applyFilter() {
    readFilter();
    const h = query();
    history.replaceState(null, '', h ? '#' + h : location.pathname);
    S.flows = [];
    schedule('flows');
    connect();
  }

  function init() {
    const p = new URLSearchParams(location.hash.slice(1));
    $('filter-cluster').value = p.get('cluster') || '';
    $('filter-pod').value = p.get('pod') || '';
    $('filter-verdict').value = p.get('verdict') || '';
    readFilter();
    let t = 0;
    const later = () => { clearTimeout(t); t = setTimeout(applyFilter, 200); };
    $('filter-cluster').addEventListener('input', later);
    $('filter-pod').addEventListener('input', later);
    $('filter-verdict').addEventListener('change', applyFilter);
    $('filters').addEventListener('reset', () => setTimeout(applyFilter, 0));
    $('filters').addEventListener('submit', (e) => { e.preventDefault(); applyFilter(); });
    window.addEventListener('resize', () => schedule('map'));
    connect();
    schedule('flows', 'header');
  }

  init();
})();
