// A small Markdown renderer that is safe by construction: every character of the source is
// HTML-escaped first, and only the tags written here are ever produced.
(function (global) {
  "use strict";

  function escapeHtml(text) {
    return text
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  function inline(escaped) {
    const codes = [];
    let out = escaped.replace(/`([^`\n]+)`/g, function (_, code) {
      codes.push(code);
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    out = out
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(
        /\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>'
      );
    return out.replace(/\u0000(\d+)\u0000/g, function (_, i) {
      return "<code>" + codes[Number(i)] + "</code>";
    });
  }

  function render(source) {
    const lines = source.split("\n");
    const html = [];
    let paragraph = [];
    let list = null;

    function flushParagraph() {
      if (paragraph.length) {
        html.push("<p>" + paragraph.map(inline).join("<br>") + "</p>");
        paragraph = [];
      }
    }
    function flushList() {
      if (list) {
        html.push("<" + list.tag + ">" + list.items.map(function (item) {
          return "<li>" + inline(item) + "</li>";
        }).join("") + "</" + list.tag + ">");
        list = null;
      }
    }

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^```/);
      if (fence) {
        flushParagraph();
        flushList();
        const code = [];
        i++;
        while (i < lines.length && !/^```/.test(lines[i])) {
          code.push(escapeHtml(lines[i]));
          i++;
        }
        html.push("<pre><code>" + code.join("\n") + "</code></pre>");
        continue;
      }
      const escaped = escapeHtml(line);
      const heading = escaped.match(/^(#{1,6})\s+(.*)$/);
      const bullet = escaped.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = escaped.match(/^\s*\d+[.)]\s+(.*)$/);
      if (heading) {
        flushParagraph();
        flushList();
        const level = heading[1].length;
        html.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
      } else if (bullet || numbered) {
        flushParagraph();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) {
          flushList();
          list = { tag: tag, items: [] };
        }
        list.items.push((bullet || numbered)[1]);
      } else if (escaped.trim() === "") {
        flushParagraph();
        flushList();
      } else {
        flushList();
        paragraph.push(escaped);
      }
    }
    flushParagraph();
    flushList();
    return html.join("");
  }

  global.renderMarkdown = render;
})(window);
