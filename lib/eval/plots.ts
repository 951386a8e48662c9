/**
 * The report's plots: Vega-Lite specs compiled with `vega-lite`, rendered headless to SVG with
 * `vega` and rasterised to PNG with `@resvg/resvg-js` (DejaVu Sans, white background).
 * @module
 */
import { compile, type TopLevelSpec } from 'vega-lite';
import * as vega from 'vega';
import { Resvg } from '@resvg/resvg-js';

import { writeFileAtomic } from '../model/safetensors.js';

const FONT = 'DejaVu Sans';

/** One row of a line plot's data. */
export interface LineRow {
  variant: string;
  x: number;
  y: number;
  /** Which measure (a dashed line per measure when there are several). */
  measure?: string;
}

/** A line chart of y against x, a colour per variant (and a dash per measure). */
export function lineSpec(title: string, xTitle: string, yTitle: string, rows: readonly LineRow[], options: { xScale?: 'linear' | 'log'; square?: boolean; diagonal?: boolean } = {}): TopLevelSpec {
  const measures = new Set(rows.map((r) => r.measure ?? ''));
  // Integer x values (N, k, K) get a tick each and no decimals.
  const xs = [...new Set(rows.map((r) => r.x))].sort((a, b) => a - b);
  const integral = !options.square && xs.every((x) => Number.isInteger(x)) && xs.length <= 24;
  const encoding = {
    x: {
      field: 'x',
      type: 'quantitative' as const,
      title: xTitle,
      scale: { type: options.xScale ?? 'linear', ...(options.square ? { domain: [0, 1] } : {}) },
      ...(integral ? { axis: { values: xs, format: 'd' } } : {}),
    },
    y: { field: 'y', type: 'quantitative' as const, title: yTitle, scale: { domain: [0, 1] } },
    color: { field: 'variant', type: 'nominal' as const, title: 'variant' },
    ...(measures.size > 1 ? { strokeDash: { field: 'measure', type: 'nominal' as const, title: 'measure', legend: { symbolType: 'stroke', symbolStrokeWidth: 2, symbolSize: 400, encode: { symbols: { update: { stroke: { value: '#333' } } } } } } } : {}),
  };
  // Points mark the measured x values of a curve; a ROC curve has too many to show.
  const line = { mark: { type: 'line' as const, point: integral, strokeWidth: 2 }, encoding };
  const layers: object[] = [line];
  if (options.diagonal) {
    layers.unshift({
      data: { values: [{ x: 0, y: 0 }, { x: 1, y: 1 }] },
      mark: { type: 'line', color: '#999', strokeDash: [4, 4] },
      encoding: { x: { field: 'x', type: 'quantitative' }, y: { field: 'y', type: 'quantitative' } },
    });
  }
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: { text: title, fontSize: 15 },
    width: options.square ? 360 : 480,
    height: 360,
    data: { values: rows.map((r) => ({ ...r, measure: r.measure ?? '' })) },
    layer: layers,
    config: { font: FONT, axis: { labelFontSize: 12, titleFontSize: 13 }, legend: { labelFontSize: 12, titleFontSize: 13, labelLimit: 260 } },
  } as TopLevelSpec;
}

/** Renders a spec to SVG text. */
export async function renderSvg(spec: TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

/** Rasterises SVG to PNG bytes (2x scale for legibility). */
export function svgToPng(svg: string): Uint8Array {
  const resvg = new Resvg(svg, { background: 'white', fitTo: { mode: 'zoom', value: 2 }, font: { loadSystemFonts: true, defaultFontFamily: FONT } });
  return resvg.render().asPng();
}

/** Writes `base.svg` (and `base.png`); returns the paths written. */
export async function writePlot(base: string, spec: TopLevelSpec, png: boolean): Promise<string[]> {
  const svg = await renderSvg(spec);
  await writeFileAtomic(`${base}.svg`, [new TextEncoder().encode(svg)], { overwrite: true });
  if (!png) return [`${base}.svg`];
  await writeFileAtomic(`${base}.png`, [svgToPng(svg)], { overwrite: true });
  return [`${base}.svg`, `${base}.png`];
}
