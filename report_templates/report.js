/* clipaudit report: sortable and paged tables, a class filter and search. No network, no libraries. */
(function () {
  "use strict";

  function sortKey(row, index, numeric) {
    var cell = row.cells[index];
    if (!cell) { return numeric ? NaN : ""; }
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
    if (!numeric) { return raw.trim().toLowerCase(); }
    return raw.trim() === "" ? NaN : Number(raw);
  }

  function compare(a, b, numeric) {
    if (numeric) {
      if (isNaN(a)) { return isNaN(b) ? 0 : 1; }  /* missing values last */
      if (isNaN(b)) { return -1; }
      return a - b;
    }
    return a < b ? -1 : a > b ? 1 : 0;
  }

  function sortBy(table, th, index) {
    var numeric = th.getAttribute("data-type") === "num";
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (row, i) {
      return { row: row, key: sortKey(row, index, numeric), i: i };
    });
    rows.sort(function (a, b) {
      var c = compare(a.key, b.key, numeric);
      if (!ascending && !(numeric && (isNaN(a.key) || isNaN(b.key)))) { c = -c; }
      return c !== 0 ? c : a.i - b.i;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
    Array.prototype.forEach.call(th.parentNode.cells, function (other) {
      other.setAttribute("aria-sort", "none");
    });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  /* Paged tables: only one page of the rows that pass the class filter is shown. */
  var pagers = [];

  function Pager(table) {
    this.table = table;
    this.size = Number(table.getAttribute("data-page-size")) || 50;
    this.page = 0;
    var nav = document.createElement("div");
    nav.className = "pager";
    this.prev = document.createElement("button");
    this.prev.type = "button";
    this.prev.textContent = "previous";
    this.next = document.createElement("button");
    this.next.type = "button";
    this.next.textContent = "next";
    this.label = document.createElement("span");
    nav.appendChild(this.prev);
    nav.appendChild(this.label);
    nav.appendChild(this.next);
    table.parentNode.insertBefore(nav, table.nextSibling);
    this.nav = nav;
    var self = this;
    this.prev.addEventListener("click", function () { self.page -= 1; self.render(); });
    this.next.addEventListener("click", function () { self.page += 1; self.render(); });
  }

  Pager.prototype.render = function () {
    var rows = Array.prototype.slice.call(this.table.tBodies[0].rows);
    var shown = rows.filter(function (r) { return !r.classList.contains("filtered-out"); });
    var pages = Math.max(1, Math.ceil(shown.length / this.size));
    this.page = Math.min(Math.max(this.page, 0), pages - 1);
    var first = this.page * this.size;
    rows.forEach(function (r) { r.hidden = true; });
    shown.slice(first, first + this.size).forEach(function (r) { r.hidden = false; });
    this.nav.hidden = shown.length <= this.size;
    this.prev.disabled = this.page === 0;
    this.next.disabled = this.page >= pages - 1;
    this.label.textContent = shown.length === 0 ? "no rows" :
      "rows " + (first + 1) + "–" + Math.min(first + this.size, shown.length) + " of " + shown.length;
  };

  function pagerOf(table) {
    for (var i = 0; i < pagers.length; i += 1) {
      if (pagers[i].table === table) { return pagers[i]; }
    }
    return null;
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.paged"), function (table) {
    var pager = new Pager(table);
    pagers.push(pager);
    pager.render();
  });

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, index) {
      var button = th.querySelector("button.sort");
      if (button) {
        button.addEventListener("click", function () {
          sortBy(table, th, index);
          var pager = pagerOf(table);
          if (pager) { pager.page = 0; pager.render(); }
        });
      }
    });
  });

  /* The class filter: an exact class (select, small reports) and/or a search text. */
  var filter = document.getElementById("class-filter");
  var search = document.getElementById("class-search");
  var status = document.getElementById("filter-status");

  function applyFilter() {
    var wanted = filter ? filter.value : "";
    var text = search ? search.value.trim().toLowerCase() : "";
    var cards = 0;
    var classes = {};
    Array.prototype.forEach.call(document.querySelectorAll("[data-class]"), function (el) {
      var name = el.getAttribute("data-class");
      var match = (wanted === "" || name === wanted) &&
        (text === "" || name.toLowerCase().indexOf(text) !== -1);
      if (el.tagName === "TR" && el.parentNode.parentNode.classList.contains("paged")) {
        el.classList.toggle("filtered-out", !match);
      } else {
        el.hidden = !match;
      }
      if (match) {
        classes[name] = true;
        if (el.classList.contains("card")) { cards += 1; }
      }
    });
    pagers.forEach(function (p) { p.page = 0; p.render(); });
    if (wanted === "" && text === "") {
      status.textContent = "";
    } else {
      status.textContent = Object.keys(classes).length + " class(es), " + cards + " finding card(s) shown";
    }
  }

  if (filter) { filter.addEventListener("change", applyFilter); }
  if (search) { search.addEventListener("input", applyFilter); }
  /* Each card's own checkbox switches its images and overlays (CSS alone); this one sets them all. */
  var everyCard = document.getElementById("heatmaps-all");
  if (everyCard) {
    everyCard.addEventListener("change", function () {
      Array.prototype.forEach.call(document.querySelectorAll("input.heatmap-switch"), function (box) {
        box.checked = everyCard.checked;
      });
    });
  }
})();
