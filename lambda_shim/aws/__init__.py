"""The AWS side of lambda_shim: the Lambda handler that runs cai-hpc ranks over TcpComm, the
plan and Step Functions workflow, the local emulation (Runtime API, sandbox) and cost figures,
with the image's Dockerfile and the SAM template beside them."""
