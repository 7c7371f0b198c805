// Parses KQL queries with Microsoft's Kusto language service (@kusto/language-service-next, installed in
// node_modules/ by scripts/bootstrap.sh) and prints what it finds wrong, for tests/infra/test_kql.py.
//
// stdin:  {"queries": [{"id": "...", "text": "..."}, ...]}
// stdout: {"version": "<package version>", "results": [{"id": "...", "diagnostics": [
//            {"severity": "Error", "code": "KS142", "message": "...", "start": 22, "length": 3}, ...],
//          "columns": [{"name": "timestamp", "type": "datetime"}, ...]}]}
// where columns is the result's schema as the analysis infers it (null when the result is not a table).
//
// The analysis is semantic, not only syntactic: the queries run against a database that holds the two
// Application Insights tables alertgate's telemetry lands in (docs/telemetry.md), with their real column
// names and types, so a misspelt column, an unknown table or a type mismatch is an error. Workbook
// parameter placeholders ({Tenant}, ...) must be replaced with literals before the text comes here.
'use strict';

const fs = require('fs');
const path = require('path');

// The package is a Bridge.NET build of Kusto.Language: bridge.min.js defines the global Bridge runtime
// and System, Kusto.Language.Bridge.min.js defines the global Kusto namespace on top of it.
require('@kusto/language-service-next/bridge.min');
require('@kusto/language-service-next/Kusto.Language.Bridge.min');

/* global Kusto */
const Language = Kusto.Language;
const Symbols = Language.Symbols;

// The classic Application Insights tables (the columns the workbook and the alert rules may name).
const TABLES = {
  customMetrics:
    '(timestamp:datetime, name:string, value:real, valueCount:int, valueSum:real, valueMin:real, ' +
    'valueMax:real, valueStdDev:real, customDimensions:dynamic, cloud_RoleName:string, ' +
    'cloud_RoleInstance:string, itemType:string)',
  customEvents:
    '(timestamp:datetime, name:string, itemType:string, customDimensions:dynamic, ' +
    'customMeasurements:dynamic, operation_Id:string, cloud_RoleName:string)',
};

function globals() {
  const tables = Object.entries(TABLES).map(
    ([name, schema]) => new Symbols.TableSymbol.$ctor7(name, schema, null),
  );
  const database = new Symbols.DatabaseSymbol.ctor('applicationinsights', tables);
  return Language.GlobalState.Default.WithDatabase(database);
}

function analyse(text, state) {
  const code = Language.KustoCode.ParseAndAnalyze(text, state);
  const found = code.GetDiagnostics();
  const diagnostics = [];
  for (let i = 0; i < found.Count; i += 1) {
    const d = found.getItem(i);
    diagnostics.push({
      severity: d.Severity,
      code: d.Code,
      message: d.Message,
      start: d.HasLocation ? d.Start : null,
      length: d.HasLocation ? d.Length : null,
    });
  }
  const result = code.ResultType;
  let columns = null;
  if (result && result.Columns) {
    columns = [];
    for (let i = 0; i < result.Columns.Count; i += 1) {
      const column = result.Columns.getItem(i);
      columns.push({ name: column.Name, type: column.Type ? column.Type.Name : null });
    }
  }
  return { diagnostics, columns };
}

function main() {
  const input = JSON.parse(fs.readFileSync(0, 'utf8'));
  if (!input || !Array.isArray(input.queries)) {
    throw new Error('expected {"queries": [{"id": ..., "text": ...}]} on stdin');
  }
  const state = globals();
  const results = input.queries.map((query) => ({ id: query.id, ...analyse(String(query.text), state) }));
  const manifest = path.join(
    path.dirname(require.resolve('@kusto/language-service-next/package.json')),
    'package.json',
  );
  const version = JSON.parse(fs.readFileSync(manifest, 'utf8')).version;
  process.stdout.write(JSON.stringify({ version, results }) + '\n');
}

main();
