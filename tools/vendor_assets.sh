#!/usr/bin/env bash
# Fetch the browser assets the built book serves itself, so a reader with no network still sees
# typeset math and rendered widgets: MathJax 3 (CHTML output, woff-v2 fonts), the ipywidgets
# HTML manager (AMD build) and RequireJS. Pinned versions; npm checks each tarball's integrity.
#   bash tools/vendor_assets.sh [DEST]      (default: book/static)
set -euo pipefail
dest=${1:-book/static}
mathjax=mathjax@3.2.2
manager=@jupyter-widgets/html-manager@1.0.6
requirejs=requirejs@2.3.4
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$mathjax" "$manager" "$requirejs" >/dev/null)
for tgz in "$tmp"/*.tgz; do
  d="${tgz%.tgz}"; mkdir -p "$d"; tar xzf "$tgz" -C "$d"
done
mj="$tmp/mathjax-3.2.2/package"
hm="$tmp/jupyter-widgets-html-manager-1.0.6/package"
rq="$tmp/requirejs-2.3.4/package"
rm -rf "$dest/mathjax" "$dest/widgets"
mkdir -p "$dest/mathjax/output/chtml/fonts" "$dest/widgets"
cp "$mj/es5/tex-mml-chtml.js" "$dest/mathjax/"
cp -r "$mj/es5/output/chtml/fonts/woff-v2" "$dest/mathjax/output/chtml/fonts/"
cp "$mj/LICENSE" "$dest/mathjax/LICENSE"
cp "$hm/dist/embed-amd.js" "$dest/widgets/"
cp "$hm/LICENSE" "$dest/widgets/LICENSE.html-manager" 2>/dev/null || cp "$hm/dist/embed.js.LICENSE.txt" "$dest/widgets/LICENSE.html-manager"
cp "$rq/require.js" "$dest/widgets/"
# Font Awesome webfonts that the widget CSS asks for, next to embed-amd.js (its public path).
cp "$hm"/dist/*.woff2 "$hm"/dist/*.woff "$dest/widgets/"
echo "vendored $mathjax, $manager, $requirejs into $dest"
