// The polling client of the original API document (batches-api.ko.md), unchanged but for
// where the base URL, token and interval come from: node poll_client.mjs BASE PIPELINE BATCH
const [base, pipelineId, batchId] = process.argv.slice(2);
const accessToken = process.env.DHUB_TOKEN;
const interval = Number(process.env.POLL_INTERVAL_MS || 1000);

async function pollBatchStatus(pipelineId, batchId, interval = 5000) {
  while (true) {
    const response = await fetch(`${base}/api/v1/batches/${pipelineId}/${batchId}`, {
      headers: { 'Authorization': `Bearer ${accessToken}` }
    });
    const batch = await response.json();
    console.log(`Batch state: ${batch.state.state}`);
    // Check step states
    for (const [stepName, stepState] of Object.entries(batch.state.steps)) {
      console.log(` ${stepName}: ${stepState.state}`);
    }
    // Check if completed
    const allDone = Object.values(batch.state.steps)
      .every(s => s.state === 'success' || s.state === 'failed');
    if (allDone || batch.state.state === 'stop') {
      console.log('Batch completed');
      break;
    }
    await new Promise(resolve => setTimeout(resolve, interval));
  }
}

await pollBatchStatus(pipelineId, batchId, interval);
