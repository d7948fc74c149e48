/**
 * Building DOM from text only: every string from the server goes through
 * textContent or an attribute, never innerHTML, so a crafted notebook name or
 * portal message shows as text and cannot inject markup.
 */

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className = '',
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

const SVG = 'http://www.w3.org/2000/svg';

/** A small line chart of values in 0..100, oldest first. */
export function sparkline(values: number[], label: string, width = 120, height = 24): SVGSVGElement {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('class', 'jp-gpuportal-spark');
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height));
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', label);
  const title = document.createElementNS(SVG, 'title');
  title.textContent = label;
  svg.appendChild(title);
  const line = document.createElementNS(SVG, 'polyline');
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  const points = values.map((v, i) => {
    const y = height - 1 - (Math.min(100, Math.max(0, v)) / 100) * (height - 2);
    return `${(i * step).toFixed(1)},${y.toFixed(1)}`;
  });
  line.setAttribute('points', points.join(' '));
  line.setAttribute('fill', 'none');
  svg.appendChild(line);
  return svg;
}
