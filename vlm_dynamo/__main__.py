from vlm_dynamo.worker import main

main()
