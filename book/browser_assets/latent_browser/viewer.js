/* The book's latent browser: a static, offline viewer of the data written by
   wsae_core.browser.write_latent_browser (window.WSAE_LATENT_BROWSER, loaded by data.js).
   No dependencies; every string from the data is inserted as text, never as HTML. */
(function () {
  "use strict";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function fmt(v, digits) {
    if (v === undefined || v === null) return "–";
    return Number(v).toPrecision(digits || 3).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
  }

  function tokenText(s) {
    return s.replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
  }

  function start(root, data) {
    var saes = data.saes, tokens = data.tokens, latents = data.latents;
    var byKey = {};
    latents.forEach(function (l) {
      byKey[l.sae + "-" + l.id] = l;
      // The strongest token of each top context: a reader's first clue to what the latent does.
      var seen = {}, top = [];
      l.top.forEach(function (c) {
        var best = 0;
        for (var i = 1; i < c.a.length; i++) if (c.a[i] > c.a[best]) best = i;
        var s = tokens[c.t[best]].trim();
        if (s && !seen[s]) { seen[s] = true; top.push(s); }
      });
      l.topTokens = top;
      var more = l.explanations ? Object.keys(l.explanations).map(function (k) { return l.explanations[k]; }) : [];
      l.search = [l.explanation || ""].concat(more, top).join(" ").toLowerCase();
    });

    root.textContent = "";
    root.appendChild(el("p", "wsae-lb-about", "Layer " + data.layer + " of " + data.description + ". " +
      (data.sae_seed !== undefined && data.sae_seed !== null ? "SAEs of training seed " + data.sae_seed + ": " : "") +
      latents.length + " sampled latents of " + saes.map(function (s) {
        return s.name + " (" + s.n_latents + " latents" + (s.k ? ", k = " + s.k : "") + ", " +
          fmt(100 * s.dead_fraction, 2) + "% dead)";
      }).join(", ") + ". Per latent: " + data.selection.top + " top-activating and " + data.selection.quantiles +
      " quantile contexts, each a window of up to " + data.selection.window_before + " tokens before and " +
      data.selection.window_after + " after the strongest token, within one document."));
    var controls = el("div", "wsae-lb-controls");
    var search = el("input", "wsae-lb-search");
    search.type = "search";
    search.placeholder = "search explanations and top tokens";
    search.setAttribute("aria-label", "search latents");
    var which = el("select", "wsae-lb-which");
    which.appendChild(new Option("all SAEs", "all"));
    saes.forEach(function (s, i) { which.appendChild(new Option(s.name, String(i))); });
    var onlyExplained = el("input");
    onlyExplained.type = "checkbox";
    var onlyLabel = el("label", "wsae-lb-only");
    onlyLabel.appendChild(onlyExplained);
    onlyLabel.appendChild(document.createTextNode(" with an explanation"));
    var count = el("span", "wsae-lb-count");
    [search, which, onlyLabel, count].forEach(function (c) { controls.appendChild(c); });
    root.appendChild(controls);

    var body = el("div", "wsae-lb-body");
    var list = el("ul", "wsae-lb-list");
    var detail = el("div", "wsae-lb-detail");
    body.appendChild(list);
    body.appendChild(detail);
    root.appendChild(body);

    function label(l) {
      return saes[l.sae].name + " #" + l.id;
    }

    function renderList() {
      var q = search.value.trim().toLowerCase(), w = which.value, n = 0;
      list.textContent = "";
      latents.forEach(function (l) {
        if (w !== "all" && String(l.sae) !== w) return;
        if (onlyExplained.checked && !l.explanation) return;
        if (q && l.search.indexOf(q) < 0) return;
        n++;
        var li = el("li", "wsae-lb-item");
        li.dataset.key = l.sae + "-" + l.id;
        li.appendChild(el("span", "wsae-lb-item-name", label(l)));
        li.appendChild(el("span", "wsae-lb-item-text",
          l.explanation ? l.explanation : "top tokens: " + l.topTokens.slice(0, 4).join(", ")));
        li.addEventListener("click", function () { show(l); });
        list.appendChild(li);
      });
      count.textContent = n + " of " + latents.length + " latents";
    }

    function context(c) {
      var row = el("div", "wsae-lb-context");
      c.t.forEach(function (t, i) {
        var span = el("span", "wsae-lb-tok", tokenText(tokens[t]));
        var a = c.a[i];
        if (a > 0) {
          span.style.backgroundColor = "rgba(230, 85, 13, " + (0.12 + 0.78 * a / 100).toFixed(3) + ")";
          span.classList.add("wsae-lb-on");
        }
        span.title = "activation " + a + "% of the latent's maximum";
        row.appendChild(span);
      });
      return row;
    }

    function histogram(l) {
      var ns = "http://www.w3.org/2000/svg", w = 360, h = 90, n = l.hist.length;
      var max = Math.max.apply(null, l.hist.concat([1]));
      var svg = document.createElementNS(ns, "svg");
      svg.setAttribute("class", "wsae-lb-hist");
      svg.setAttribute("viewBox", "0 0 " + w + " " + (h + 16));
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", "histogram of the latent's non-zero activations");
      l.hist.forEach(function (c, i) {
        var r = document.createElementNS(ns, "rect"), bh = c ? Math.max(1, h * c / max) : 0;
        r.setAttribute("x", (i * w / n + 1).toFixed(1));
        r.setAttribute("width", (w / n - 2).toFixed(1));
        r.setAttribute("y", (h - bh).toFixed(1));
        r.setAttribute("height", bh.toFixed(1));
        var tip = document.createElementNS(ns, "title");
        tip.textContent = c + " tokens";
        r.appendChild(tip);
        svg.appendChild(r);
      });
      [["0", 0, "start"], [fmt(l.max), w, "end"]].forEach(function (t) {
        var tx = document.createElementNS(ns, "text");
        tx.setAttribute("x", t[1]);
        tx.setAttribute("y", h + 13);
        tx.setAttribute("text-anchor", t[2]);
        tx.textContent = t[0];
        svg.appendChild(tx);
      });
      return svg;
    }

    function show(l) {
      detail.textContent = "";
      Array.prototype.forEach.call(list.children, function (li) {
        li.classList.toggle("wsae-lb-current", li.dataset.key === l.sae + "-" + l.id);
      });
      if (history.replaceState) history.replaceState(null, "", "#latent-" + l.sae + "-" + l.id);
      detail.appendChild(el("h3", "wsae-lb-title", label(l)));
      var ex = el("p", "wsae-lb-explanation");
      if (l.explanation) {
        ex.appendChild(el("strong", null, "Explanation" + (l.explainer ? " (" + l.explainer + " explainer)" : "") + ": "));
        ex.appendChild(document.createTextNode(l.explanation));
      } else if (l.explanation_withheld) {
        ex.textContent = "Explanation withheld: the auto-interpretability run saw this latent fire in another " +
          "number of documents, so it explained other weights of this SAE (a re-training diverged).";
      } else {
        ex.textContent = "No explanation: this latent was not among those the auto-interpretability run scored.";
      }
      detail.appendChild(ex);
      Object.keys(l.explanations || {}).forEach(function (name) {
        var more = el("p", "wsae-lb-explanation");
        more.appendChild(el("strong", null, "Explanation (" + name + " explainer): "));
        more.appendChild(document.createTextNode(l.explanations[name]));
        detail.appendChild(more);
      });
      if (l.scores && l.scores.length) {
        detail.appendChild(el("p", "wsae-lb-scores", l.scores.map(function (s) {
          return s.scorer + " AUROC " + Number(s.auroc).toFixed(2) + " (" + s.explainer + " explainer)";
        }).join("; ")));
      }
      if (l.score !== undefined) {
        var auc = l.detection_auc !== undefined || l.fuzzing_auc !== undefined ?
          "; AUC " + fmt(l.detection_auc) + " / " + fmt(l.fuzzing_auc) : "";
        detail.appendChild(el("p", "wsae-lb-scores", "score " + fmt(l.score) + " (balanced accuracy: detection " +
          fmt(l.detection) + ", fuzzing " + fmt(l.fuzzing) + auc + ")"));
      }
      detail.appendChild(el("p", "wsae-lb-stats",
        "fires on " + fmt(100 * l.frequency) + "% of tokens, in " + l.n_docs + " documents; maximum activation " +
        fmt(l.max) + "; top tokens: " + l.topTokens.join(", ")));
      detail.appendChild(el("h4", null, "Activation histogram (non-zero activations)"));
      detail.appendChild(histogram(l));
      detail.appendChild(el("h4", null, "Top-activating contexts"));
      l.top.forEach(function (c) { detail.appendChild(context(c)); });
      if (l.quantiles.length) {
        detail.appendChild(el("h4", null, "Contexts across activation quantiles"));
        l.quantiles.forEach(function (c) { detail.appendChild(context(c)); });
      }
      detail.appendChild(el("h4", null, "Nearest latents in the other SAEs (decoder cosine)"));
      Object.keys(l.neighbours).forEach(function (s) {
        var p = el("p", "wsae-lb-neighbours");
        p.appendChild(el("span", "wsae-lb-neighbours-sae", saes[s].name + ": "));
        l.neighbours[s].forEach(function (pair, i) {
          var other = byKey[s + "-" + pair[0]], text = "#" + pair[0] + " (" + fmt(pair[1], 2) + ")";
          var node;
          if (other) {
            node = el("a", "wsae-lb-link", text);
            node.href = "#latent-" + s + "-" + pair[0];
            node.addEventListener("click", function (e) { e.preventDefault(); show(other); });
          } else {
            node = el("span", "wsae-lb-nolink", text);
          }
          if (i) p.appendChild(document.createTextNode(", "));
          p.appendChild(node);
        });
        detail.appendChild(p);
      });
    }

    // Typing filters at once; a "change" listener on the text field would rebuild the list when it
    // loses focus, i.e. between the mousedown and the click on an item.
    search.addEventListener("input", renderList);
    which.addEventListener("change", renderList);
    onlyExplained.addEventListener("change", renderList);
    renderList();
    var m = /^#latent-(\d+)-(\d+)$/.exec(location.hash);
    var first = (m && byKey[m[1] + "-" + m[2]]) || latents.filter(function (l) { return l.explanation; })[0] || latents[0];
    if (first) show(first);
  }

  function boot() {
    var root = document.getElementById("wsae-latent-browser");
    if (!root) return;
    if (!window.WSAE_LATENT_BROWSER) {
      root.textContent = "The latent browser's data (data.js) did not load.";
      throw new Error("WSAE_LATENT_BROWSER data missing");
    }
    start(root, window.WSAE_LATENT_BROWSER);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
