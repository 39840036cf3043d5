// Types for checking dashboard JSON against @grafana/schema.
import type { DataQuery } from '@grafana/schema';

/**
 * What a value of type T looks like in JSON. The schema's string enums (FieldColorModeId,
 * LegendDisplayMode, ...) become the union of their values, since JSON holds "table", not
 * LegendDisplayMode.Table; numeric enums, required fields and unknown keys are checked as
 * they are.
 */
export type FromJson<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<FromJson<U>>
      : T extends object
        ? { [K in keyof T]: FromJson<T[K]> }
        : T;

/**
 * A Prometheus query as Grafana stores it in a panel's targets. @grafana/schema publishes
 * no type for it; this follows Grafana's PrometheusDataQuery (the fields the dashboards
 * may use, nothing else).
 */
export interface PrometheusQuery extends DataQuery {
  expr: string;
  legendFormat?: string;
  instant?: boolean;
  range?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  editorMode?: 'code' | 'builder';
  interval?: string;
  exemplar?: boolean;
}
