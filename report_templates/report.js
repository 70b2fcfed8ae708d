/* clipaudit report: sortable tables and a class filter. No network, no libraries. */
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

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, index) {
      var button = th.querySelector("button.sort");
      if (button) {
        button.addEventListener("click", function () { sortBy(table, th, index); });
      }
    });
  });

  var filter = document.getElementById("class-filter");
  var status = document.getElementById("filter-status");
  if (filter) {
    filter.addEventListener("change", function () {
      var wanted = filter.value;
      var shown = 0;
      Array.prototype.forEach.call(document.querySelectorAll("[data-class]"), function (el) {
        el.hidden = wanted !== "" && el.getAttribute("data-class") !== wanted;
        if (!el.hidden && el.classList.contains("card")) { shown += 1; }
      });
      status.textContent = wanted === "" ? "" : shown + " finding card(s) shown";
    });
  }

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
