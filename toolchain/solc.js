#!/usr/bin/env node
// Exposes npm's official solc (an emscripten build) as a native-looking solc
// binary for py-solc-x and brownie: `--version` and `--standard-json` only.
'use strict';
const fs = require('fs');
const path = require('path');

const args = process.argv.slice(2);
const solc = require(path.join(__dirname, '..', 'node_modules', 'solc'));

if (args.includes('--version')) {
  process.stdout.write('solc, the solidity compiler commandline interface\n');
  process.stdout.write(`Version: ${solc.version()}\n`);
  process.exit(0);
}
if (!args.includes('--standard-json')) {
  process.stderr.write('this solc adapter supports only --version and --standard-json\n');
  process.exit(2);
}

// Folders a source may be read from: --allow-paths, --base-path, --include-path and the cwd.
const roots = [process.cwd()];
for (let i = 0; i < args.length; i++) {
  if (['--allow-paths', '--base-path', '--include-path'].includes(args[i]) && args[i + 1]) {
    roots.push(...args[i + 1].split(',').filter(Boolean));
  }
}

function findImports(importPath) {
  const candidates = path.isAbsolute(importPath)
    ? [importPath]
    : roots.map((root) => path.resolve(root, importPath));
  for (const candidate of candidates) {
    if (fs.existsSync(candidate) && fs.statSync(candidate).isFile()) {
      return { contents: fs.readFileSync(candidate, 'utf8') };
    }
  }
  return { error: `File not found: ${importPath} (searched ${roots.join(', ')})` };
}

const input = fs.readFileSync(0, 'utf8');
process.stdout.write(solc.compile(input, { import: findImports }));
